"""Helpers of the engine tests: tiny configs and callbacks that misbehave on purpose.

Importable by jsonargparse in-process (pytest puts tests/ on sys.path) and in
subprocesses (the tests set PYTHONPATH).
"""
from __future__ import annotations

import errno
import math
import os
import signal

from lightning.pytorch.callbacks import Callback

TINY_KWARGS = {"depths": [1, 1, 1, 1], "embed_dims": [16, 32, 64, 128], "head_dim": 16, "num_patterns": 2}


def tiny_config(path, *, root_dir, max_steps=4, every=2, batch_size=8, extra="") -> str:
    """A YAML config: a tiny image StructViT on digits, a few steps, checkpoints every ``every`` steps."""
    text = f"""seed_everything: 0
trainer:
  default_root_dir: {root_dir}
  accelerator: cpu
  devices: 1
  max_steps: {max_steps}
  limit_val_batches: 1
  limit_test_batches: 1
  limit_predict_batches: 2
  val_check_interval: {every}
  check_val_every_n_epoch: null
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  deterministic: true
model:
  model: structvit_tiny
  model_kwargs: {{depths: [1, 1, 1, 1], embed_dims: [16, 32, 64, 128], head_dim: 16, num_patterns: 2, drop_path_rate: 0.1}}
  lr: 0.002
  warmup_steps: 2
data:
  class_path: structvit.data.ImageDataModule
  init_args:
    dataset: digits
    batch_size: {batch_size}
checkpoint:
  every_n_train_steps: {every}
{extra}"""
    with open(path, "w") as f:
        f.write(text)
    return str(path)


class KillAtStep(Callback):
    """SIGKILL this process right after optimiser step ``step`` (no cleanup, no final checkpoint)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class NaNAtStep(Callback):
    """Poison the input batch of optimiser step ``step`` with NaN (the weights stay good)."""

    def __init__(self, step: int):
        self.step = step
        self.fired = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and not self.fired:
            batch[0].fill_(math.nan)
            self.fired = True


class FullDiskFile:
    """A file whose ``write`` stores half of what it is given, then fails as a full disk does."""

    def __init__(self, path, mode="r", *args, **kwargs):
        self.f = open(path, mode, *args, **kwargs)

    def write(self, data):
        data = memoryview(data).cast("B")
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()
