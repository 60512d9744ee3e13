"""Training and evaluation engine: the paper's recipe on Lightning.

* :class:`ClassificationModule`: any registered model, AdamW + warmup-cosine per step,
  label smoothing, Mixup/CutMix, EMA, top-1/top-5, multi-view testing.
* :class:`StructViTCLI` / ``structvit fit|validate|test|predict``: LightningCLI with YAML
  configs (``configs/``), checkpoints exported as safetensors, exact resume.

The names are imported on first use, so that ``structvit.engine.weights`` (torch and
safetensors only) works without the ``train`` extra (Lightning).
"""
from __future__ import annotations

import importlib

_WHERE = {
    "ClassificationModule": "module", "NonFiniteLossError": "module",
    "StructViTCheckpoint": "callbacks", "AtomicCheckpointIO": "callbacks", "DeterministicData": "callbacks", "Throughput": "callbacks",
    "export_safetensors": "callbacks",
    "ResumableLoader": "loaders", "ShardedEvalLoader": "loaders",
    "WarmupCosine": "optim", "build_optimizer": "optim", "param_groups": "optim",
    "load_weights": "weights", "save_weights": "weights", "check_weights": "weights", "read_safetensors": "weights",
}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
