"""``ClassificationModule``: the training recipe of the paper as a LightningModule.

Any timm-registered model (the StructViT family and its SA/ConvSA variants through
``model_kwargs``), trained with AdamW (no weight decay on norms, biases, position
encodings and StructSA patterns), a per-step cosine schedule with linear warmup, label
smoothing, timm Mixup/CutMix (videos are mixed with one box for all frames), stochastic
depth (``model_kwargs.drop_path_rate``), an EMA of the weights evaluated next to the
weights themselves, torchmetrics top-1/top-5 accuracy, and multi-view testing (the
softmax scores of the ``V`` views of a video are averaged). Gradient clipping, mixed
precision and the distributed strategy belong to Lightning's ``Trainer``.

Randomness is a function of ``(seed, step)``: the generators are reseeded before every
training step, so a run resumed from a checkpoint draws the same drop-path masks and
mixup boxes as an uninterrupted one.

The schedule's length (and a warmup given in epochs) is planned when training starts
(``on_train_start``), after Lightning has restored the checkpoint: asking
``trainer.estimated_stepping_batches`` in ``configure_optimizers`` would build the training
loader before its saved position is restored, and a resumed run would replay the epoch
from its first batch. A run resumed with another length (``max_steps``, ``max_epochs``,
``limit_train_batches``, accumulation) warns and, by default (``resume_schedule="replan"``),
re-plans the cosine over the new length from the step it is at; ``"keep"`` keeps the
checkpoint's schedule (past its end the learning rate stays at ``min_lr``).
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import warnings
from typing import Any, Optional, Sequence

import lightning as L
import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from ..models import check_model_name  # (importing the models registers them with timm)
from .loaders import sample_seed
from .optim import WarmupCosine, param_groups
from .weights import check_weights, load_weights

__all__ = ["ClassificationModule", "NonFiniteLossError", "available_models"]


class NonFiniteLossError(RuntimeError):
    """The training loss was NaN or infinite (training stops; checkpoints are left as they were)."""


def available_models() -> list[str]:
    return timm.list_models()


class ClassificationModule(L.LightningModule):
    """Image/video classification with the StructViT recipe.

    Args:
        model: a timm model name, e.g. ``structvit_tiny``, ``structvit_b_4_1``.
        model_kwargs: keyword arguments of the model (``struct_blocks``, ``attention``,
            ``num_patterns``, ``drop_path_rate``, ``num_frames``, ...).
        num_classes: classifier outputs; the command line links it to the data module's.
        pretrained: weights to start from (``.safetensors`` or a weights-only torch
            file): a StructViT or UniFormer/SA state dict; StructSA blocks missing from it
            get the SA-equivalent patterns (see ``structvit.conversion.load_uniformer``).
        pretrained_inflate: ``"center"``/``"average"``: spread 2-D (image) kernels over
            time (video from image weights); None: shapes must match.
        pretrained_ignore_head: skip the checkpoint's classifier (another label set).
        lr, weight_decay, betas, eps: AdamW.
        warmup_steps / warmup_epochs: linear warmup length (steps win if both given).
        min_lr: the cosine schedule's final learning rate.
        label_smoothing: for the plain cross-entropy (and inside Mixup's soft targets).
        mixup, cutmix, mixup_prob, mixup_switch_prob, mixup_mode: timm Mixup/CutMix
            (off when both alphas are 0).
        ema_decay: keep an exponential moving average of the weights (e.g. 0.9998) and
            report ``val/ema_acc1`` next to ``val/acc1``; None: no EMA.
        ema_warmup: ramp the EMA decay as ``min(decay, (1 + n) / (10 + n))``.
        ema_test: test/predict with the EMA weights instead of the raw ones.
        view_average: ``"softmax"`` (average the probabilities of the views, default) or
            ``"logits"``.
        nonfinite_loss: ``"stop"`` (raise :class:`NonFiniteLossError` naming the step)
            or ``"skip"`` (the batch leaves no trace: no parameter update, the model's
            buffers such as BatchNorm's running statistics put back as they were before
            the forward pass, no EMA update; the step still counts towards ``max_steps``).
        resume_schedule: on resuming with another training length, ``"replan"`` the
            cosine over the new length (default) or ``"keep"`` the checkpoint's; either
            way with a warning.
        grad_checkpointing: activation checkpointing in the model (memory for compute).
    """

    def __init__(
        self,
        model: str = "structvit_tiny",
        model_kwargs: Optional[dict] = None,
        num_classes: int = 10,
        pretrained: Optional[str] = None,
        pretrained_inflate: Optional[str] = None,
        pretrained_ignore_head: bool = False,
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        warmup_steps: Optional[int] = None,
        warmup_epochs: float = 0.0,
        min_lr: float = 1e-6,
        label_smoothing: float = 0.1,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        mixup_mode: str = "batch",
        ema_decay: Optional[float] = None,
        ema_warmup: bool = True,
        ema_test: bool = False,
        view_average: str = "softmax",
        nonfinite_loss: str = "stop",
        grad_checkpointing: bool = False,
        resume_schedule: str = "replan",
    ):
        super().__init__()
        check_model_name(model, "model")
        model_kwargs = dict(model_kwargs or {})
        if "num_classes" in model_kwargs:
            raise ValueError("give num_classes as --model.num_classes (or let the data module set it), "
                             "not inside model_kwargs")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if nonfinite_loss not in ("stop", "skip"):
            raise ValueError(f"nonfinite_loss must be 'stop' or 'skip', got {nonfinite_loss!r}")
        if resume_schedule not in ("replan", "keep"):
            raise ValueError(f"resume_schedule must be 'replan' or 'keep', got {resume_schedule!r}")
        if view_average not in ("softmax", "logits"):
            raise ValueError(f"view_average must be 'softmax' or 'logits', got {view_average!r}")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {ema_decay!r}")
        if lr <= 0 or weight_decay < 0 or not 0 <= label_smoothing < 1:
            raise ValueError(f"need lr > 0, weight_decay >= 0, 0 <= label_smoothing < 1; got {lr}, "
                             f"{weight_decay}, {label_smoothing}")
        self.save_hyperparameters()
        self.hparams.model_kwargs = model_kwargs
        self.model = timm.create_model(model, num_classes=num_classes, **model_kwargs)
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        if pretrained:
            self._load_pretrained(pretrained, pretrained_inflate, pretrained_ignore_head)
        self.ema_model = None
        if ema_decay is not None:
            self.ema_model = copy.deepcopy(self.model).requires_grad_(False)  # only evaluated (eval mode there)
            self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self.mixup_fn = None
        if mixup > 0 or cutmix > 0:
            from timm.data import Mixup

            self.mixup_fn = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mixup_prob,
                                  switch_prob=mixup_switch_prob, mode=mixup_mode,
                                  label_smoothing=label_smoothing, num_classes=num_classes)
        k = min(5, num_classes)
        self.topk = k
        self.train_acc = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_metrics = self._metric_set(num_classes, k)
        self.test_metrics = self._metric_set(num_classes, k)
        self.val_ema_metrics = self._metric_set(num_classes, k) if ema_decay is not None else None
        self.test_ema_metrics = self._metric_set(num_classes, k) if ema_decay is not None else None
        self.run_config: Optional[str] = None  # the resolved YAML config, set by the command line
        self._skipped_step = False  # the current training batch was skipped (non-finite loss)

    @staticmethod
    def _metric_set(num_classes: int, k: int) -> nn.ModuleDict:
        return nn.ModuleDict({"acc1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
                              f"acc{k}": MulticlassAccuracy(num_classes, top_k=k, average="micro"),
                              "loss": MeanMetric()})  # sample-weighted over all processes

    # ------------------------------------------------------------------ weights
    def _load_pretrained(self, path: str, inflate: Optional[str], ignore_head: bool) -> None:
        from ..conversion import load_uniformer

        sd, meta = load_weights(path)
        sd = check_weights(sd, self.model.state_dict(), path)  # finite, same kinds; other float dtypes cast
        if meta.get("model") and meta["model"] != self.hparams.model and inflate is None:
            other = meta["model"]
            if _video_of(other) != _video_of(self.hparams.model):
                raise ValueError(f"pretrained weights {path} are of model {other!r}, not {self.hparams.model!r}; "
                                 "pass --model.pretrained_inflate center to start a video model from image weights")
        report = load_uniformer(self.model, sd, inflate=inflate, strict=False, ignore_head=ignore_head)
        if report.unexpected:
            raise ValueError(f"pretrained weights {path} do not fit {self.hparams.model!r}: unexpected keys "
                             f"{', '.join(report.unexpected[:5])}{' ...' if len(report.unexpected) > 5 else ''}")
        self.pretrained_report = report

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        hp = checkpoint.get("hyper_parameters") or {}
        mine = (self.hparams.model, self.hparams.num_classes)
        theirs = (hp.get("model"), hp.get("num_classes"))
        if theirs[0] is not None and theirs != mine:
            raise ValueError(f"the checkpoint is of model {theirs[0]!r} with {theirs[1]} classes, this run builds "
                             f"{mine[0]!r} with {mine[1]} classes; pass --model.model {theirs[0]} or another checkpoint")
        own = self.state_dict()
        sd = checkpoint.get("state_dict", {})
        bad = [k for k in own if k not in sd or tuple(sd[k].shape) != tuple(own[k].shape)]
        extra = [k for k in sd if k not in own]
        if bad or extra:
            name = (bad or extra)[0]
            raise ValueError(f"the checkpoint does not fit model {mine[0]!r} ({len(bad)} missing or differently "
                             f"shaped tensors, {len(extra)} unexpected; first: {name}); were model_kwargs "
                             f"{json.dumps(hp.get('model_kwargs'))} in the checkpoint's run?")

    def setup(self, stage: str) -> None:
        strategy = type(self.trainer.strategy).__name__ if self._trainer is not None else ""
        if self.ema_model is not None and "FSDP" in strategy:
            raise ValueError("ema_decay is not supported with the FSDP strategy (the EMA copy is not sharded); "
                             "use --trainer.strategy ddp or --model.ema_decay null")

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    @property
    def is_video(self) -> bool:
        return bool(getattr(self.model, "video", False))

    def _check_batch(self, x: torch.Tensor, views: bool = True) -> None:
        want = 5 if self.is_video else 4
        if x.dim() not in ((want, want + 1) if views else (want,)):
            kind = "video" if self.is_video else "image"
            other = "a video model (e.g. structvit_tiny_video)" if x.dim() >= 5 and not self.is_video else \
                "an image model (e.g. structvit_tiny)"
            raise ValueError(f"model {self.hparams.model!r} is an {kind} model but the data gives batches of shape "
                             f"{tuple(x.shape)}; use {other} or other data")

    def _views_forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Scores (B, K): log-probabilities averaged over views for (B, V, ...) inputs."""
        want = 5 if self.is_video else 4
        if x.dim() == want + 1:  # (B, V, C, [T,] H, W): average the views of each sample
            b, v = x.shape[:2]
            logits = model(x.flatten(0, 1)).float().view(b, v, -1)
            if self.hparams.view_average == "softmax":
                return logits.softmax(-1).mean(1).clamp_min(1e-12).log()
            return logits.mean(1)
        return model(x).float()

    # ------------------------------------------------------------------ training
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # the random draws of this step (drop path, mixup) depend on (seed, step, rank) only
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        s = sample_seed(seed, 1_000_000 + self.trainer.global_step, self.global_rank)
        torch.manual_seed(s)
        np.random.seed(s % (2 ** 32))
        random.seed(s)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self._check_batch(x, views=False)
        self._skipped_step = False
        # the forward pass of a bad batch writes into BatchNorm's running statistics before the loss
        # is known: keep the buffers to put them back (small next to the parameters)
        saved = [b.detach().clone() for b in self.model.buffers()] if self.hparams.nonfinite_loss == "skip" else None
        target = y
        if self.mixup_fn is not None:
            if x.shape[0] % 2 == 0:
                shape = x.shape
                xm, target = self.mixup_fn(x.flatten(1, 2) if x.dim() == 5 else x, y)  # one box for all frames
                x = xm.view(shape)
            else:
                target = F.one_hot(y, self.hparams.num_classes).float()
                k = self.hparams.num_classes
                target = target * (1 - self.hparams.label_smoothing) + self.hparams.label_smoothing / k
        logits = self.model(x).float()
        if target.dim() == 2:
            loss = torch.sum(-target * F.log_softmax(logits, -1), -1).mean()
        else:
            loss = F.cross_entropy(logits, target, label_smoothing=self.hparams.label_smoothing)
        finite = bool(torch.isfinite(loss))
        if self.trainer.world_size > 1:  # all processes stop or skip together (no one left in a collective)
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            step = self.trainer.global_step
            msg = (f"non-finite loss ({loss.item()}) at step {step} (epoch {self.current_epoch}, batch {batch_idx})")
            if self.hparams.nonfinite_loss == "skip":
                with torch.no_grad():
                    for b, old in zip(self.model.buffers(), saved):
                        b.copy_(old)
                self._skipped_step = True  # no backward, no parameter update (no gradient), no EMA update
                warnings.warn(msg + ": batch skipped", RuntimeWarning, stacklevel=1)
                self.log("train/skipped_batches", 1.0, on_step=False, on_epoch=True, reduce_fx="sum")
                return None
            raise NonFiniteLossError(msg)
        self.train_acc(logits.detach(), y)
        bs = x.shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=bs)
        self.log("train/acc1", self.train_acc, on_step=True, on_epoch=True, batch_size=bs)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False,
                 prog_bar=True, batch_size=bs)
        return loss

    def optimizer_step(self, *args, **kwargs):
        out = super().optimizer_step(*args, **kwargs)
        # the EMA follows every optimiser step here, not in on_train_batch_end: ModelCheckpoint saves
        # in its own on_train_batch_end, which runs before the module's, and a run resumed from that
        # checkpoint would miss the update of the step it was saved at
        self._update_ema()
        return out

    def _update_ema(self) -> None:
        if self.ema_model is None or self._skipped_step:
            return
        self.ema_updates += 1
        decay = self.hparams.ema_decay
        if self.hparams.ema_warmup:
            n = float(self.ema_updates.item())
            decay = min(decay, (1.0 + n) / (10.0 + n))
        with torch.no_grad():
            ema_p = [p for p in self.ema_model.parameters()]
            cur_p = [p.detach() for p in self.model.parameters()]
            torch._foreach_lerp_(ema_p, cur_p, 1.0 - decay)
            for eb, b in zip(self.ema_model.buffers(), self.model.buffers()):
                eb.copy_(b)

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch, metrics: nn.ModuleDict, ema_metrics: Optional[nn.ModuleDict], prefix: str):
        x, y = batch[0], batch[1]  # evaluation batches may carry more (indices, skipped count)
        if x is None:  # every sample of the batch was unreadable (counted by the data module)
            return
        self._check_batch(x)
        if bool((y < 0).any()):
            raise ValueError(f"the {prefix} data has no labels (e.g. the Kinetics-400 test CSV, SSv2's test.json); "
                             "it can only be predicted: `structvit predict --config ...` or `structvit predict FILE "
                             "--checkpoint CKPT`")
        main_model = self.ema_model if (prefix == "test" and self.hparams.ema_test and self.ema_model is not None) \
            else self.model
        scores = self._views_forward(main_model, x)
        loss = F.nll_loss(scores, y) if x.dim() == (6 if self.is_video else 5) and \
            self.hparams.view_average == "softmax" else F.cross_entropy(scores, y)
        self._update(metrics, scores, y, loss, prefix, "")
        if ema_metrics is not None and main_model is self.model:
            ema_scores = self._views_forward(self.ema_model, x)
            ema_loss = F.nll_loss(ema_scores, y) if x.dim() == (6 if self.is_video else 5) and \
                self.hparams.view_average == "softmax" else F.cross_entropy(ema_scores, y)
            self._update(ema_metrics, ema_scores, y, ema_loss, prefix, "ema_")

    def _update(self, metrics: nn.ModuleDict, scores, y, loss, prefix: str, tag: str) -> None:
        for name, m in metrics.items():
            if name == "loss":
                m.update(loss.detach(), weight=y.shape[0])
            else:
                m.update(scores, y)
            self.log(f"{prefix}/{tag}{name}", m, on_step=False, on_epoch=True, prog_bar=not tag and name == "acc1",
                     batch_size=y.shape[0])

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_metrics, self.val_ema_metrics, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, self.test_metrics, self.test_ema_metrics, "test")

    def on_validation_epoch_start(self) -> None:
        self._skipped_before = self._data_skipped("val")

    def on_test_epoch_start(self) -> None:
        self._skipped_before = self._data_skipped("test")

    def on_validation_epoch_end(self) -> None:
        self._report_skipped("val")

    def on_test_epoch_end(self) -> None:
        self._report_skipped("test")

    def _data_skipped(self, key: str) -> int:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return int(dm.num_skipped(key)) if dm is not None and hasattr(dm, "num_skipped") else 0

    def _report_skipped(self, prefix: str) -> None:
        """Log ``{prefix}/skipped_samples``: unreadable samples left out of this evaluation
        (summed over processes), with a warning naming the count when there are any."""
        if self._trainer is None or self.trainer.sanity_checking:
            return
        n = self._data_skipped(prefix) - getattr(self, "_skipped_before", 0)
        total = int(self.trainer.strategy.reduce(torch.tensor(float(n), device=self.device), reduce_op="sum")) \
            if self.trainer.world_size > 1 else n
        self.log(f"{prefix}/skipped_samples", float(total), on_step=False, on_epoch=True, sync_dist=False)
        if total and self.trainer.is_global_zero:
            warnings.warn(f"{prefix}: {total} unreadable sample(s) skipped (not scored); the metrics are over the "
                          "readable ones; `structvit data check` lists the files", UserWarning, stacklevel=1)

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if x is None:  # every sample of the batch was unreadable
            return {"index": batch[2], "skipped": batch[3]} if len(batch) > 3 else None
        self._check_batch(x)
        model = self.ema_model if (self.hparams.ema_test and self.ema_model is not None) else self.model
        scores = self._views_forward(model, x)
        prob = scores.exp() if self.hparams.view_average == "softmax" and x.dim() == (6 if self.is_video else 5) \
            else scores.softmax(-1)
        top_p, top_i = prob.topk(self.topk, dim=-1)
        out = {"pred": top_i[:, 0], "topk": top_i, "topk_prob": top_p}
        if isinstance(batch, (tuple, list)) and len(batch) > 1:
            out["target"] = batch[1]
        if isinstance(batch, (tuple, list)) and len(batch) > 3:  # indexed prediction batches
            out["index"], out["skipped"] = batch[2], batch[3]
        return out

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(param_groups(self.model, hp.weight_decay), lr=hp.lr, betas=tuple(hp.betas),
                                eps=hp.eps)
        # provisional length: the plan is made in on_train_start (see the module docstring); the
        # multiplier at step 0 does not depend on the length
        total = max(1, int(self.trainer.max_steps)) if self._trainer is not None and self.trainer.max_steps > 0 else 1
        warmup = min(int(hp.warmup_steps or 0), total)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, WarmupCosine(total, warmup, min_ratio=min(1.0, hp.min_lr / hp.lr)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def planned_schedule(self) -> tuple[int, int]:
        """``(total_steps, warmup_steps)`` of this run, from the trainer's length and the
        training loader (call once the loader is set up, e.g. from ``on_train_start``)."""
        hp = self.hparams
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total < 1:
            total = max(1, int(self.trainer.max_steps)) if self.trainer.max_steps > 0 else 1
        total = int(total)
        if hp.warmup_steps is not None:
            warmup = int(hp.warmup_steps)
        else:
            warmup = int(round(hp.warmup_epochs * self._steps_per_epoch(total)))
        return total, min(warmup, total)

    def on_train_start(self) -> None:
        sched = self.lr_schedulers()
        if not isinstance(sched, torch.optim.lr_scheduler.LambdaLR) or not isinstance(sched.lr_lambdas[0],
                                                                                      WarmupCosine):
            return  # another scheduler (a subclass's configure_optimizers)
        fn = sched.lr_lambdas[0]
        total, warmup = self.planned_schedule()
        old = (fn.total_steps, fn.warmup_steps)
        if old == (total, warmup):
            return
        if self.trainer.ckpt_path is not None:  # resumed with another length
            step = sched.last_epoch
            lr_old = sched.base_lrs[0] * fn(step)
            what = (f"the checkpoint's schedule ran {old[0]} steps (warmup {old[1]}), this run's length gives "
                    f"{total} (warmup {warmup})")
            if self.hparams.resume_schedule == "keep":
                warnings.warn(f"{what}; keeping the checkpoint's schedule (--model.resume_schedule keep): "
                              f"lr {lr_old:.3g} at step {step}" + (", min_lr from now on" if step >= old[0] else ""),
                              UserWarning, stacklevel=1)
                return
            new_fn = WarmupCosine(total, warmup, fn.min_ratio, fn.warmup_start)
            warnings.warn(f"{what}; re-planning the cosine over {total} steps from step {step} "
                          f"(lr {lr_old:.3g} -> {sched.base_lrs[0] * new_fn(step):.3g}); "
                          "--model.resume_schedule keep keeps the old one", UserWarning, stacklevel=1)
        fn.total_steps, fn.warmup_steps = total, warmup
        # the learning rate of the coming step under the plan, as LambdaLR computes it
        lrs = [base * f(sched.last_epoch) for f, base in zip(sched.lr_lambdas, sched.base_lrs)]
        for group, lr in zip(sched.optimizer.param_groups, lrs):
            group["lr"] = lr
        sched._last_lr = list(lrs)

    def _steps_per_epoch(self, fallback: int) -> float:
        n = self.trainer.num_training_batches
        if math.isfinite(n) and n > 0:
            return n / max(1, self.trainer.accumulate_grad_batches)
        return float(fallback)

    # ------------------------------------------------------------------ export
    def export_metadata(self) -> dict[str, str]:
        """safetensors metadata: model name, kwargs, classes and the run's config."""
        hp = self.hparams
        meta = {"format": "structvit", "model": hp.model, "model_kwargs": json.dumps(hp.model_kwargs, default=list),
                "num_classes": str(hp.num_classes), "hparams": json.dumps(dict(hp), default=str)}
        if self.run_config:
            meta["config"] = self.run_config
        meta.update({k: json.dumps(v) for k, v in self._data_metadata().items()})
        return meta

    def _data_metadata(self) -> dict:
        """``classes`` and ``preprocessing`` (the data module's evaluation pipeline: size,
        frames, sampling, views, normalisation) for exports and checkpoints; ``structvit
        predict`` reads them."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        out = {}
        if dm is None:
            return out
        try:
            classes = getattr(dm, "classes", None)
            if classes is not None:
                out["classes"] = [str(c) for c in classes]
        except Exception:  # noqa: BLE001 - a data module that cannot list its classes
            pass
        if hasattr(dm, "eval_preprocessing"):
            out["preprocessing"] = dm.eval_preprocessing()
        return out

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["structvit"] = self._data_metadata()


def _video_of(name: str) -> bool:
    return "video" in name or name.endswith("_4_1")
