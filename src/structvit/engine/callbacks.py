"""Callbacks of the engine.

* :class:`StructViTCheckpoint`: Lightning's ``ModelCheckpoint`` (``dirpath`` defaults to
  ``<default_root_dir>/checkpoints``, so ``--ckpt_path last`` finds the last checkpoint of
  the run) that also exports every checkpoint it keeps as ``<name>.safetensors`` (the
  model's weights; ``<name>.ema.safetensors`` for the EMA weights) with the model name,
  its kwargs, the class names and the resolved run config as metadata, and saves
  ``last`` once more when training ends.
* :class:`AtomicCheckpointIO`: Lightning's ``TorchCheckpointIO`` writing each checkpoint to
  a temporary file in its own folder, fsynced, then renamed over the checkpoint's name.
  Lightning's own writer stages the file in ``$TMPDIR`` and copies it when the run folder
  is on another filesystem, so a kill during the copy leaves a truncated checkpoint;
  :class:`StructViTCheckpoint` installs this one on the trainer's strategy.
* :class:`DeterministicData`: swaps the data module's training loader for a
  :class:`~structvit.engine.loaders.ResumableLoader` (exact resume, same global batches
  on any number of processes) and, on several processes, its evaluation loaders for
  unpadded shards.
* :class:`Throughput`: logs ``train/samples_per_sec`` (and shows it in the progress bar).
"""
from __future__ import annotations

import os
import time
from collections import deque
from typing import Any, Optional

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from ..checkpoint import save_torch
from .loaders import ResumableLoader, ShardedEvalLoader
from .weights import save_weights

__all__ = ["StructViTCheckpoint", "AtomicCheckpointIO", "DeterministicData", "Throughput", "export_safetensors"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic in the checkpoint's own folder
    (:func:`structvit.checkpoint.save_torch`); a failed write raises
    :class:`~structvit.checkpoint.CheckpointWriteError` naming the path. Remote URLs
    (``s3://`` and the like) are left to Lightning."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_torch(checkpoint, path)


def export_safetensors(trainer: "L.Trainer", pl_module: "L.LightningModule", path: str) -> list[str]:
    """Write the module's model (and EMA) weights next to ``path`` as safetensors; all ranks
    must call (the full state dict may need a collective), rank 0 writes."""
    sd = trainer.strategy.lightning_module_state_dict()
    base = path[:-len(".ckpt")] if path.endswith(".ckpt") else path
    meta = pl_module.export_metadata() if hasattr(pl_module, "export_metadata") else {}
    meta = dict(meta, step=str(trainer.global_step), epoch=str(trainer.current_epoch))
    written = []
    if trainer.is_global_zero:
        for prefix, suffix in (("model.", ""), ("ema_model.", ".ema")):
            part = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            if part:
                out = f"{base}{suffix}.safetensors"
                save_weights(out, part, dict(meta, weights="ema" if suffix else "model"))
                written.append(out)
    return written


class StructViTCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` plus safetensors export (see the module docstring).

    Same arguments as Lightning's ``ModelCheckpoint``; ``export`` turns the safetensors
    copies off.
    """

    def __init__(self, *args, export: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.export = bool(export)

    def setup(self, trainer, pl_module, stage) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not a user's own plugin
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        super().setup(trainer, pl_module, stage)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if self.export:
            export_safetensors(trainer, trainer.lightning_module, filepath)

    def _remove_checkpoint(self, trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        if trainer.is_global_zero and str(filepath).endswith(".ckpt"):
            base = str(filepath)[:-len(".ckpt")]
            for suffix in ("", ".ema"):
                p = f"{base}{suffix}.safetensors"
                if os.path.exists(p):
                    os.remove(p)

    def on_train_end(self, trainer, pl_module) -> None:
        # save `last` at the very end too, not only at the last multiple of every_n_train_steps
        if self.save_last and self._last_global_step_saved != trainer.global_step and not trainer.sanity_checking:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        else:
            super().on_train_end(trainer, pl_module)


class DeterministicData(Callback):
    """Resumable, process-count-independent training order (see :mod:`structvit.engine.loaders`).

    ``seed`` None: Lightning's global seed (``seed_everything``).
    """

    def __init__(self, seed: Optional[int] = None, shard_eval: bool = True):
        self.seed = seed
        self.shard_eval = shard_eval

    def setup(self, trainer, pl_module, stage: str) -> None:
        dm = trainer.datamodule
        if dm is None or getattr(dm, "_structvit_wrapped", False):
            return
        seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        rank, world = trainer.global_rank, trainer.world_size
        original = {name: getattr(dm, name) for name in ("train_dataloader", "val_dataloader", "test_dataloader",
                                                        "predict_dataloader")}

        def train_dataloader():
            dl = original["train_dataloader"]()
            return ResumableLoader(dl, seed=seed, rank=rank, world=world) if isinstance(
                dl, torch.utils.data.DataLoader) else dl

        dm.train_dataloader = train_dataloader
        if world > 1 and self.shard_eval:
            for name in ("val_dataloader", "test_dataloader", "predict_dataloader"):
                def make(orig=original[name]):
                    def loader():
                        dl = orig()
                        return ShardedEvalLoader(dl, rank, world) if isinstance(dl, torch.utils.data.DataLoader) else dl
                    return loader
                setattr(dm, name, make())
        dm._structvit_wrapped = True

    def on_train_start(self, trainer, pl_module) -> None:
        # an epoch may be shorter than the loader (limit_train_batches): tell the loader where it ends
        loader = trainer.fit_loop._combined_loader
        n = trainer.num_training_batches
        for dl in (loader.flattened if loader is not None else []):
            if isinstance(dl, ResumableLoader) and isinstance(n, int):
                dl.epoch_batches = n


class Throughput(Callback):
    """``train/samples_per_sec``: samples (all processes) per second over the last ``window``
    training steps, data loading included; logged every step (written every
    ``log_every_n_steps``) and shown in the progress bar."""

    def __init__(self, window: int = 10):
        self.window = int(window)
        self._marks: deque = deque(maxlen=self.window + 1)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._marks.clear()
        self._marks.append((time.perf_counter(), 0))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        x = x["image"] if isinstance(x, dict) else x  # segmentation: dict batches
        size = len(x) if isinstance(x, (tuple, list)) else int(x.shape[0])  # detection: a list of images
        total = self._marks[-1][1] + size * trainer.world_size if self._marks else 0
        self._marks.append((time.perf_counter(), total))
        (t0, n0), (t1, n1) = self._marks[0], self._marks[-1]
        if len(self._marks) > 1 and t1 > t0:
            pl_module.log("train/samples_per_sec", (n1 - n0) / (t1 - t0), on_step=True, on_epoch=False,
                          prog_bar=True, batch_size=size)
