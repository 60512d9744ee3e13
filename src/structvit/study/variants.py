"""The variant's model: built from its spec, with the study-level change that model keyword
arguments cannot express (``value_patterns: head``), and its cost (parameters, GFLOPs)."""
from __future__ import annotations

from typing import Optional

import timm
import torch
from torch.nn.utils import parametrize

from .. import models as _models  # noqa: F401  (registers the models with timm)
from ..models.summary import count_flops, count_params
from ..nn import StructSA
from .plan import StudyError


def resolved_model_kwargs(spec: dict) -> dict:
    """The spec's model keyword arguments with YAML lists turned into the tuples the models take."""
    kw = dict(spec["model_kwargs"])
    for key in ("struct_blocks", "window", "window_v", "kv_stride", "depths", "embed_dims"):
        if isinstance(kw.get(key), list):
            kw[key] = tuple(kw[key])
    return kw


class SharedOverChannels(torch.nn.Module):
    """Parametrization of a channel-wise ``u_v`` (heads, C, D, *window) by one aggregator
    per head and pattern, (heads, 1, D, *window), broadcast over the head's C channels.

    Registered with :func:`torch.nn.utils.parametrize.register_parametrization` on a
    StructSA layer's ``u_v`` by :func:`tie_value_patterns`.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """(heads, 1, D, *window) -> (heads, C, D, *window), a broadcast view."""
        return u.expand(u.shape[0], self.channels, *u.shape[2:])

    def right_inverse(self, u: torch.Tensor) -> torch.Tensor:
        """(heads, C, D, *window) -> (heads, 1, D, *window): channel 0 of the channel-wise init,
        which has the per-head layout's init distribution."""
        return u[:, :1].detach().clone()


def tie_value_patterns(model) -> int:
    """Share every channel-wise StructSA layer's value aggregators over the channels of a head.

    The op takes one layout for ``u_k`` and ``u_v`` (channel-wise with per-head value
    patterns is refused), so the mixed form of the paper's Table 6a (channel-wise
    correlation, dot-product aggregation) is expressed in the channel-wise layout with
    ``u_v`` parametrized as (heads, 1, D, *window) broadcast over the channels: the same
    function and the same trainable parameters as per-head aggregators. Returns the number
    of layers tied; raises if the model has no channel-wise StructSA layer.
    """
    n = 0
    for m in model.modules():
        if isinstance(m, StructSA) and m.patterns == "channel":
            parametrize.register_parametrization(m, "u_v", SharedOverChannels(m.u_v.shape[1]))
            n += 1
    if n == 0:
        raise StudyError("value_patterns: 'head' needs channel-wise StructSA layers (patterns: channel); "
                         "the model has none")
    return n


def prepare_model(model, spec: dict):
    """Study-level changes of a built model that model kwargs cannot express (``value_patterns``)."""
    if spec.get("value_patterns") == "head":
        tie_value_patterns(model)
    return model


def build_model(spec: dict, device: str = "cpu", num_classes: Optional[int] = None, **extra):
    """The variant's model (as ``ClassificationModule`` builds it), e.g. on the ``meta`` device."""
    n = num_classes or spec.get("num_classes") or 10
    with torch.device(device):
        model = timm.create_model(spec["model"], num_classes=n, **{**resolved_model_kwargs(spec), **extra})
    return prepare_model(model, spec)


def model_cost(spec: dict) -> dict:
    """Parameters, GMACs and GFLOPs (2 per multiply-add) of one eval forward pass on
    ``input_shape``, counted on the meta device by the project's counter
    (:func:`structvit.models.summary.count_flops`), StructSA in the form the model runs
    (channel-wise or strided: the paper's key-convolution form)."""
    model = build_model(spec, "meta")
    # value_patterns ties parameters, not operations: count the FLOPs on the untied model
    # (the FLOP counter's module tracker cannot follow a parametrization)
    plain = build_model({k: v for k, v in spec.items() if k != "value_patterns"}, "meta") \
        if spec.get("value_patterns") else model
    macs = count_flops(plain, (1, *spec["input_shape"]), "meta")
    return {"params": count_params(model), "gmacs": macs / 1e9, "gflops": 2 * macs / 1e9}

