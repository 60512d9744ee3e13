"""Weights for the engine: reading and writing through :mod:`structvit.checkpoint`, and
:func:`check_weights`, which makes a state dict fit the model it is meant for.

:func:`check_weights` compares a state dict with the tensors of the model it is meant
for: another floating dtype is cast (with one warning); a non-floating tensor where the
model has a floating one (or the other way round) and NaN/inf values are refused,
naming the tensor and the file.

This module needs only torch and safetensors (the core install).
"""
from __future__ import annotations

import os
import warnings
from typing import Mapping, Optional

import torch

from ..checkpoint import _read_safetensors, read_checkpoint, write_safetensors

__all__ = ["load_weights", "save_weights", "read_safetensors", "check_weights"]


def read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file, metadata unchecked; a malformed file
    raises ``ValueError`` naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    return _read_safetensors(path)


def load_weights(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state_dict, metadata)`` of a weights file (:func:`structvit.checkpoint.read_checkpoint`,
    metadata checked): a safetensors file's metadata strings, ``{"model": NAME}`` for a
    Lightning checkpoint, empty for a plain state dict."""
    ckpt = read_checkpoint(path)
    if ckpt.format == "safetensors":
        return ckpt.state_dict, dict(ckpt.metadata)
    return ckpt.state_dict, ({"model": ckpt.model} if ckpt.model else {})


def check_weights(state_dict: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                  path: Optional[str] = None) -> dict[str, torch.Tensor]:
    """``state_dict`` made fit for the model whose tensors are ``reference`` (its ``state_dict()``).

    * every floating tensor must be finite (``ValueError`` naming the tensor and ``path``);
    * a tensor of a name the model has must be of the same kind (floating or not) as the
      model's (``ValueError``); a floating one of another dtype is cast to the model's, with
      one ``UserWarning`` for all of them;
    * names the model does not have are passed through (a converter may rename them).
    """
    where = f" in {path}" if path else ""
    out, cast = {}, []
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor):  # not weights (e.g. a step counter): left to the loader
            out[name] = value
            continue
        if (value.is_floating_point() or value.is_complex()) and value.numel():
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                bad = int((~finite).sum())
                raise ValueError(f"tensor {name!r}{where} has {bad} non-finite (NaN/inf) of {value.numel()} values; "
                                 "refusing to load it (take an earlier checkpoint)")
        ref = reference.get(name)
        if isinstance(ref, torch.Tensor):
            if value.is_floating_point() != ref.is_floating_point():
                raise ValueError(f"tensor {name!r}{where} is {str(value.dtype).replace('torch.', '')}, the model's is "
                                 f"{str(ref.dtype).replace('torch.', '')}; refusing to load it")
            if value.is_floating_point() and value.dtype != ref.dtype:
                cast.append((name, value.dtype, ref.dtype))
                value = value.to(ref.dtype)
        out[name] = value
    if cast:
        kinds = sorted({f"{str(a).replace('torch.', '')} -> {str(b).replace('torch.', '')}" for _, a, b in cast})
        warnings.warn(f"{len(cast)} tensors{where} cast to the model's dtype ({', '.join(kinds)}; first: "
                      f"{cast[0][0]})", UserWarning, stacklevel=2)
    return out


def save_weights(path: str, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write ``state_dict`` as safetensors, atomically
    (:func:`structvit.checkpoint.write_safetensors`)."""
    write_safetensors(path, state_dict, metadata)
