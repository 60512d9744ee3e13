"""Training and evaluation engine: the paper's recipe on Lightning.

* :class:`ClassificationModule`: any registered model, AdamW + warmup-cosine per step,
  label smoothing, Mixup/CutMix, EMA, top-1/top-5, multi-view testing.
* :class:`StructViTCLI` / ``structvit fit|validate|test|predict``: LightningCLI with YAML
  configs (``configs/``), checkpoints exported as safetensors, exact resume.
"""
from .callbacks import DeterministicData, StructViTCheckpoint, Throughput, export_safetensors
from .loaders import ResumableLoader, ShardedEvalLoader
from .module import ClassificationModule, NonFiniteLossError
from .optim import WarmupCosine, build_optimizer, param_groups
from .weights import load_weights, save_weights

__all__ = ["ClassificationModule", "NonFiniteLossError", "StructViTCheckpoint", "DeterministicData", "Throughput",
           "export_safetensors", "ResumableLoader", "ShardedEvalLoader", "WarmupCosine", "build_optimizer",
           "param_groups", "load_weights", "save_weights"]
