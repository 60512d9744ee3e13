"""Reading and writing weights without unpickling untrusted objects.

``.safetensors`` files are read with safetensors (tensors and string metadata only);
anything else with ``torch.load(weights_only=True)``, which refuses arbitrary pickled
objects. Lightning ``.ckpt`` files hold the model under ``state_dict`` with a ``model.``
prefix; :func:`load_weights` unwraps them.
"""
from __future__ import annotations

import os
from typing import Mapping

import torch

__all__ = ["load_weights", "save_weights"]


def load_weights(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state_dict, metadata)`` of a weights file (metadata empty unless safetensors)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        sd, meta = {}, {}
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            for k in f.keys():
                sd[k] = f.get_tensor(k)
        return sd, meta
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickles with non-tensor objects are refused
        raise ValueError(f"cannot read {path} as weights only ({type(err).__name__}); convert it with "
                         "`structvit convert` (which can unpickle a trusted file) to safetensors") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping) \
            and any(k.startswith("model.") for k in obj["state_dict"]):  # a Lightning checkpoint
        sd = {k[len("model."):]: v for k, v in obj["state_dict"].items() if k.startswith("model.")}
        return sd, {"model": str((obj.get("hyper_parameters") or {}).get("model", ""))}
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return dict(obj), {}


def save_weights(path: str, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write ``state_dict`` as safetensors (contiguous CPU copies; shared storage is cloned),
    atomically (a temporary file, then a rename)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata={str(k): str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)
