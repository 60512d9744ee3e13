"""A StructViT feature backbone plus torchvision's FPN, as one module for dense prediction.

:func:`build_fpn_backbone` makes the module torchvision's detectors expect (``.out_channels``,
``forward(images) -> OrderedDict`` of maps) and that :class:`~structvit.dense.semantic_fpn.SemanticFPN`
reads: the registered model's four stage maps (strides 4, 8, 16, 32; the dense backbones
``structvit_*_h14`` / ``_h32`` normalise each with ``norm1``..``norm4``) into a
:class:`torchvision.ops.FeaturePyramidNetwork` of 256 channels (1x1 lateral and 3x3 output
convolutions with bias, nearest upsampling: the mmdet / mmseg ``FPN`` the paper's detectors
use), plus a max-pooled stride-64 level ``'pool'`` for Mask R-CNN (``max_pool=True``).

Parameter names: ``body.*`` is the StructViT backbone under UniFormer's names
(``patch_embed1``, ``blocks3.0.attn.qkv``, ``norm1``..``norm4``; UniFormer's mmdet / mmseg
checkpoints hold the same under ``backbone.``), ``fpn.inner_blocks.i`` / ``fpn.layer_blocks.i``
are mmdet's ``neck.lateral_convs.i.conv`` / ``neck.fpn_convs.i.conv``.

ImageNet classification weights (a ``.safetensors`` from ``structvit fit``, a converted or
original UniFormer ``.pth``) load into the body with :func:`load_classification_weights`:
everything but the four new stage norms comes from the checkpoint, the classifier's
``norm`` / ``head`` are dropped, and both lists are reported.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import timm
import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

__all__ = ["FPN_CHANNELS", "FPNBackbone", "build_fpn_backbone", "load_classification_weights"]

#: channels of every FPN level (mmdet / mmseg / torchvision)
FPN_CHANNELS = 256


class FPNBackbone(nn.Module):
    """A StructViT (or any model with ``forward_intermediates``) and an FPN over its four stages.

    Args:
        body: the backbone; pruned here to its four stage maps (no classifier).
        out_channels: FPN width.
        max_pool: add ``'pool'``, a stride-2 max pool of the last level (Mask R-CNN's fifth level).

    ``forward(images (B, 3, H, W))`` -> OrderedDict ``'0'``..``'3'`` of (B, out_channels,
    ceil(H / s), ceil(W / s)) for s = 4, 8, 16, 32 (a dense backbone pads its input to a
    multiple of 32; others floor), plus ``'pool'`` with ``max_pool``.
    """

    def __init__(self, body: nn.Module, out_channels: int = FPN_CHANNELS, max_pool: bool = True):
        super().__init__()
        if not isinstance(out_channels, int) or isinstance(out_channels, bool) or out_channels < 1:
            raise ValueError(f"out_channels must be a positive int, got {out_channels!r}")
        body.prune_intermediate_layers((0, 1, 2, 3), prune_norm=True, prune_head=True)
        self.body = body
        self.in_channels = [info["num_chs"] for info in body.feature_info]
        self.strides = [info["reduction"] for info in body.feature_info]
        self.fpn = FeaturePyramidNetwork(self.in_channels, out_channels,
                                         extra_blocks=LastLevelMaxPool() if max_pool else None)
        self.out_channels = out_channels

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The four backbone maps (B, C_s, H_s, W_s), before the FPN."""
        return self.body.forward_intermediates(images, indices=(0, 1, 2, 3), intermediates_only=True)

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        maps = self.features(images)
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


def build_fpn_backbone(name: str, *, out_channels: int = FPN_CHANNELS, max_pool: bool = True,
                       weights: str | Mapping | None = None, **backbone_kwargs) -> FPNBackbone:
    """The registered backbone ``name`` (e.g. ``structvit_s_4_1_h32``, ``structvit_tiny``) plus an FPN.

    Args:
        name: a registered timm model name with ``forward_intermediates`` (the StructViT family).
        out_channels: FPN width (256 in the paper's detectors).
        max_pool: add the stride-64 ``'pool'`` level (Mask R-CNN); False for Semantic FPN.
        weights: ImageNet classification weights for the body (a path or a state dict),
            loaded with :func:`load_classification_weights`; None keeps the initialisation.
        backbone_kwargs: the backbone's options (``drop_path_rate``, ``struct_blocks=(0, 0)``
            for UniFormer, ``window_size``, ...).
    """
    if not isinstance(name, str) or name not in timm.list_models():
        ours = ", ".join(timm.list_models("structvit*"))
        raise ValueError(f"model must be a registered backbone name (one of {ours}), got {name!r}")
    body = timm.create_model(name, **backbone_kwargs)
    if not hasattr(body, "forward_intermediates") or not hasattr(body, "prune_intermediate_layers"):
        raise ValueError(f"model {name!r} has no forward_intermediates: it cannot be a dense backbone")
    if weights is not None:
        load_classification_weights(body, weights)
    return FPNBackbone(body, out_channels, max_pool)


def load_classification_weights(model: nn.Module, weights: str | Mapping):
    """Load an ImageNet classifier's weights into a StructViT backbone.

    Args:
        model: a StructViT (the dense models included), with or without its classifier.
        weights: a checkpoint path (read by :func:`structvit.checkpoint.read_checkpoint`:
            ``.safetensors``, Lightning ``.ckpt``, UniFormer ``.pth``) or a state dict.

    Returns:
        The :class:`structvit.convert.ConversionReport`; ``missing`` lists the tensors that
        keep their initialisation (the stage norms ``norm1``..``norm4`` of a dense model, a
        pruned head), ``unexpected`` the checkpoint tensors the backbone has no use for
        (the classifier's ``norm`` and ``head``). StructSA patterns the checkpoint lacks
        (an SA checkpoint) start SA-equivalent.

    Raises:
        ValueError: any other tensor is missing or unexpected (another model's checkpoint),
            or a shape differs (the message names the layer).
    """
    from ..checkpoint import read_checkpoint, unwrap_state_dict
    from ..convert import load_uniformer

    if isinstance(weights, Mapping):
        state_dict = unwrap_state_dict(weights)
        where = "weights"
    else:
        state_dict = read_checkpoint(weights).state_dict
        where = str(weights)
    report = load_uniformer(model, state_dict, strict=False)

    def classifier_part(key: str) -> bool:
        return key.startswith(("head.", "norm."))

    def stage_norm(key: str) -> bool:
        return key.split(".", 1)[0] in ("norm1", "norm2", "norm3", "norm4")

    foreign = [k for k in report.unexpected if not classifier_part(k)]
    absent = [k for k in report.missing if not (stage_norm(k) or classifier_part(k))]
    if foreign or absent:
        raise ValueError(f"{where} is not a checkpoint of this backbone ({type(model).__name__}): "
                         f"unexpected {foreign[:5]}{' ...' if len(foreign) > 5 else ''}, "
                         f"missing {absent[:5]}{' ...' if len(absent) > 5 else ''}")
    return report
