"""Reading, checking and writing weights without unpickling untrusted objects.

``.safetensors`` files are read with safetensors (tensors and string metadata only);
anything else with ``torch.load(weights_only=True)``, which refuses arbitrary pickled
objects. Lightning ``.ckpt`` files hold the model under ``state_dict`` with a ``model.``
prefix; :func:`load_weights` unwraps them. A file that cannot be read (truncated, not
safetensors, not a torch file) is reported in one line naming it.

:func:`check_weights` compares a state dict with the tensors of the model it is meant
for: another floating dtype is cast (with one warning); a non-floating tensor where the
model has a floating one (or the other way round) and NaN/inf values are refused,
naming the tensor and the file.

This module needs only torch and safetensors (the core install): ``structvit convert``
and ``structvit viz`` use it too.
"""
from __future__ import annotations

import os
import pickle
import warnings
from typing import Mapping, Optional

import torch

__all__ = ["load_weights", "save_weights", "read_safetensors", "check_weights"]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200]}" if text else type(err).__name__


def read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file; a malformed file raises ``ValueError``
    naming it."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors' own error type, OSError, ...
        raise ValueError(f"{path} is not a readable safetensors file ({_first_line(err)})") from None
    return sd, meta


def load_weights(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state_dict, metadata)`` of a weights file (metadata empty unless safetensors)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():
            raise ValueError(f"{path} is not a readable torch file ({_first_line(err)})") from None
        # pickles with non-tensor objects are refused
        raise ValueError(f"cannot read {path} as weights only ({type(err).__name__}); convert it with "
                         "`structvit convert` (which can unpickle a trusted file) to safetensors") from None
    except Exception as err:  # noqa: BLE001 - truncated or not a torch file at all
        raise ValueError(f"{path} is not a readable torch file ({_first_line(err)})") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping) \
            and any(k.startswith("model.") for k in obj["state_dict"]):  # a Lightning checkpoint
        sd = {k[len("model."):]: v for k, v in obj["state_dict"].items() if k.startswith("model.")}
        return sd, {"model": str((obj.get("hyper_parameters") or {}).get("model", ""))}
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return dict(obj), {}


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
    """Write ``state_dict`` as safetensors (contiguous CPU copies; shared storage is cloned),
    atomically (a temporary file, then a rename)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata={str(k): str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)
