"""Semantic segmentation training: :class:`SegmentationModule` (Semantic FPN, ADE20K).

Trains :class:`structvit.dense.semantic_fpn.SemanticFPN` over a StructViT backbone on batches
of :class:`structvit.data.ade20k.ADE20KDataModule` (``dict(image, label, image_size,
label_size)``): per-pixel cross-entropy with the ignore label 255, the logits upsampled to
the label's size (mmseg's decode head). Validation and test accumulate one confusion matrix
over the split and log mIoU (mean over the classes present in the labels or predictions,
mmseg's ``nanmean``), mAcc and pixel accuracy (``val/miou``, ``val/macc``, ``val/aacc``, in
percent as Table 9 reports them).

Inference (``inference``): ``"whole"`` runs the model on the resized image; ``"slide"`` runs
it on ``crop_size`` crops every ``stride`` pixels and averages the overlapping logits (mmseg's
``slide`` mode, 512 / 341). Either way the logits of each image's own extent (a batch is
padded) are resized bilinearly to its original label size before the argmax.

Optimiser (UniFormer's Semantic FPN config): AdamW on every parameter (the config has no
``paramwise_cfg``), mmcv's cosine annealing by iteration to ``min_lr_ratio`` with a linear
warm-up over ``warmup_iters`` from ``warmup_ratio``.

``train_global=True`` trains with global attention in stage 3 and evaluates with the model's
windows (UniFormer trains its h32 backbones "global" at 512 x 512 crops and tests "h32": at
512 x 512 stage 3 is 32 x 32 tokens, one window, so the two are the same computation there).

    structvit fit --config configs/ade20k_semfpn_structvit_s_4_1_h32.yaml --data.root DIR
"""
from __future__ import annotations

import json
import math
from typing import Optional, Sequence

import lightning as L
import torch
import torch.nn.functional as F

from ..dense.semantic_fpn import build_semantic_fpn

__all__ = ["SegmentationModule", "CosineWarmup", "confusion_matrix", "segmentation_metrics", "slide_inference",
           "IGNORE_INDEX", "INFERENCE_MODES"]

IGNORE_INDEX = 255
INFERENCE_MODES = ("whole", "slide")


class CosineWarmup:
    """mmcv's ``CosineAnnealing`` LR multiplier with linear warm-up, by optimiser step ``s``
    (picklable, for ``LambdaLR``).

    ``cos(s) = min_ratio + (1 - min_ratio) * (1 + cos(pi * s / total)) / 2``; during the first
    ``warmup_iters`` steps it is scaled by ``1 - (1 - s / warmup_iters) * (1 - warmup_ratio)``.
    """

    def __init__(self, total_steps: int, warmup_iters: int = 1000, warmup_ratio: float = 0.1,
                 min_ratio: float = 1e-8):
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        if warmup_iters < 0 or not 0 <= warmup_ratio <= 1 or not 0 <= min_ratio <= 1:
            raise ValueError(f"warmup_iters >= 0, warmup_ratio and min_ratio in [0, 1] expected, got "
                             f"{warmup_iters!r}, {warmup_ratio!r}, {min_ratio!r}")
        self.total_steps, self.warmup_iters = total_steps, int(warmup_iters)
        self.warmup_ratio, self.min_ratio = float(warmup_ratio), float(min_ratio)

    def __call__(self, step: int) -> float:
        p = min(step, self.total_steps) / self.total_steps
        factor = self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * p))
        if step < self.warmup_iters:
            factor *= 1 - (1 - step / self.warmup_iters) * (1 - self.warmup_ratio)
        return factor


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, ``[true, predicted]``, over the pixels whose
    label is not ``ignore_index`` (pred and label of the same shape, ints)."""
    if pred.shape != label.shape:
        raise ValueError(f"pred and label must have the same shape, got {tuple(pred.shape)} and {tuple(label.shape)}")
    valid = label != ignore_index
    t, p = label[valid].long(), pred[valid].long()
    if t.numel() and (int(t.max()) >= num_classes or int(t.min()) < 0):
        raise ValueError(f"label values must be in [0, {num_classes}) or {ignore_index}, got {int(t.max())}")
    return torch.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def segmentation_metrics(conf: torch.Tensor) -> dict[str, float]:
    """mIoU, mAcc (mean over classes present) and aAcc (pixel accuracy), in percent, from a confusion matrix.

    IoU_k = TP / (TP + FP + FN); classes with no pixel in labels or predictions are left out
    of the mean (mmseg's nanmean); Acc_k = TP / labelled pixels of k, over classes present in the labels.
    """
    conf = conf.double()
    tp = conf.diag()
    labelled = conf.sum(1)
    predicted = conf.sum(0)
    union = labelled + predicted - tp
    iou = tp[union > 0] / union[union > 0]
    acc = tp[labelled > 0] / labelled[labelled > 0]
    total = labelled.sum()
    return dict(miou=100 * float(iou.mean()) if iou.numel() else 0.0,
                macc=100 * float(acc.mean()) if acc.numel() else 0.0,
                aacc=100 * float(tp.sum() / total) if total > 0 else 0.0)


def slide_inference(model, image: torch.Tensor, num_classes: int, crop_size: int = 512,
                    stride: int = 341) -> torch.Tensor:
    """mmseg's sliding-window inference: logits (B, num_classes, H, W) of ``image`` (B, 3, H, W)
    from ``crop_size`` crops every ``stride`` pixels (the last crop of a row / column aligned to
    the edge), overlapping logits averaged."""
    if not 0 < stride <= crop_size:
        raise ValueError(f"stride must be in (0, crop_size={crop_size}], got {stride!r}")
    b, _, h, w = image.shape
    rows = max(h - crop_size + stride - 1, 0) // stride + 1
    cols = max(w - crop_size + stride - 1, 0) // stride + 1
    logits = image.new_zeros(b, num_classes, h, w)
    count = image.new_zeros(1, 1, h, w)
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop_size, h), min(c * stride + crop_size, w)
            y1, x1 = max(y2 - crop_size, 0), max(x2 - crop_size, 0)
            logits[:, :, y1:y2, x1:x2] += model(image[:, :, y1:y2, x1:x2])
            count[:, :, y1:y2, x1:x2] += 1
    return logits / count


class SegmentationModule(L.LightningModule):
    """Semantic FPN training and mIoU evaluation (see the module docstring).

    Args:
        model: the backbone, any registered name (``structvit_s_4_1_h32``, ``structvit_tiny``).
        num_classes: segmentation classes (ADE20K 150); the data module's.
        model_kwargs: the backbone's options (``drop_path_rate``, ``struct_blocks``, ...).
        pretrained: ImageNet classification weights of the backbone (``.safetensors`` / ``.ckpt`` /
            UniFormer ``.pth``), loaded with the classifier left out.
        head_channels, head_norm, dropout: the Semantic FPN head's (128, "bn", 0.1: mmseg's FPNHead).
        lr, weight_decay, betas: AdamW.
        max_iters: the schedule's length in optimiser steps (80,000 in the paper's recipe).
        warmup_iters, warmup_ratio, min_lr_ratio: the cosine schedule's (mmcv's).
        train_global: train with global attention in stage 3, evaluate with the model's windows.
        inference: "whole" or "slide"; crop_size, stride: the sliding window's.
    """

    def __init__(self, model: str = "structvit_tiny", num_classes: int = 150, model_kwargs: Optional[dict] = None,
                 pretrained: Optional[str] = None, head_channels: int = 128, head_norm: str = "bn",
                 dropout: float = 0.1, lr: float = 2e-4, weight_decay: float = 1e-4,
                 betas: Sequence[float] = (0.9, 0.999), max_iters: int = 80000, warmup_iters: int = 1000,
                 warmup_ratio: float = 0.1, min_lr_ratio: float = 1e-8, train_global: bool = False,
                 inference: str = "whole", crop_size: int = 512, stride: int = 341):
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or not 1 <= num_classes < IGNORE_INDEX:
            raise ValueError(f"num_classes must be an int in [1, 254], got {num_classes!r}")
        if inference not in INFERENCE_MODES:
            raise ValueError(f"inference must be one of {INFERENCE_MODES}, got {inference!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if not isinstance(max_iters, int) or max_iters < 1:
            raise ValueError(f"max_iters must be a positive int (optimiser steps), got {max_iters!r}")
        if not 0 < stride <= crop_size:
            raise ValueError(f"stride must be in (0, crop_size={crop_size}], got {stride!r}")
        self.save_hyperparameters()
        self.model = build_semantic_fpn(model, num_classes, channels=head_channels, norm=head_norm, dropout=dropout,
                                        weights=pretrained, backbone_kwargs=model_kwargs or {})
        self.run_config: Optional[str] = None
        self._confusion: dict[str, torch.Tensor] = {}

    @property
    def body(self):
        """The StructViT backbone."""
        return self.model.backbone.body

    def _use_windows(self, training: bool) -> None:
        body = self.body
        if self.hparams.train_global and hasattr(body, "set_window_size"):
            if not hasattr(self, "_model_window"):
                self._model_window = body.window_size
            body.set_window_size(None if training else self._model_window)

    # ------------------------------------------------------------------ data checks
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        n = getattr(dm, "num_classes", None)
        if n is not None and n != self.hparams.num_classes:
            raise ValueError(f"model.num_classes is {self.hparams.num_classes} but the dataset has {n} classes")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes, H, W) of normalised images (B, 3, H, W)."""
        return self.model(images)

    # ------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx):
        self._use_windows(True)
        images, labels = batch["image"], batch["label"]
        logits = self.model(images)
        if logits.shape[-2:] != labels.shape[-2:]:
            logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
        if not torch.isfinite(loss):
            from .module import NonFiniteLossError

            raise NonFiniteLossError(f"non-finite segmentation loss at step {self.global_step}: {float(loss):.4g}")
        bs = images.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=bs)
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        # UniFormer's Semantic FPN config decays every parameter (no paramwise_cfg)
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=hp.lr, betas=tuple(hp.betas),
                                      weight_decay=hp.weight_decay)
        schedule = CosineWarmup(hp.max_iters, hp.warmup_iters, hp.warmup_ratio, hp.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ inference
    def predict_logits(self, images: torch.Tensor, image_sizes: torch.Tensor | None = None,
                       label_sizes: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per image: logits (num_classes, h, w) at its label size (default: its image size)."""
        self._use_windows(False)
        hp = self.hparams
        if hp.inference == "slide":
            logits = slide_inference(self.model, images, hp.num_classes, hp.crop_size, hp.stride)
        else:
            logits = self.model(images)
        out = []
        for i in range(images.shape[0]):
            h, w = (int(v) for v in image_sizes[i]) if image_sizes is not None else images.shape[-2:]
            own = logits[i:i + 1, :, :h, :w]
            lh, lw = (int(v) for v in label_sizes[i]) if label_sizes is not None else (h, w)
            if (lh, lw) != (h, w):
                own = F.interpolate(own, size=(lh, lw), mode="bilinear", align_corners=False)
            out.append(own[0])
        return out

    def _eval_step(self, batch, stage: str) -> None:
        k = self.hparams.num_classes
        conf = self._confusion.get(stage)
        if conf is None:
            conf = self._confusion[stage] = torch.zeros(k, k, dtype=torch.int64, device=self.device)
        for i, logits in enumerate(self.predict_logits(batch["image"], batch["image_size"], batch["label_size"])):
            lh, lw = (int(v) for v in batch["label_size"][i])
            conf += confusion_matrix(logits.argmax(0), batch["label"][i, :lh, :lw], k)

    def _evaluate(self, stage: str) -> dict[str, float]:
        conf = self._confusion.pop(stage, None)
        if conf is None:
            return {}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(conf)
        metrics = segmentation_metrics(conf.cpu())
        prefix = "val" if stage == "val" else "test"
        for name, value in metrics.items():
            self.log(f"{prefix}/{name}", value, prog_bar=name == "miou", rank_zero_only=True)
        return metrics

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self._confusion.pop("val", None)

    def on_test_epoch_start(self) -> None:
        self._confusion.pop("test", None)

    def on_validation_epoch_end(self) -> None:
        self._evaluate("val")

    def on_test_epoch_end(self) -> None:
        self._evaluate("test")

    def on_train_epoch_start(self) -> None:
        self._use_windows(True)

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0):
        sizes = batch.get("label_size")
        preds = self.predict_logits(batch["image"], batch.get("image_size"), sizes)
        paths = batch.get("path") or [None] * len(preds)
        return [{"path": p, "label": logits.argmax(0).to(torch.uint8).cpu()} for p, logits in zip(paths, preds)]

    # ------------------------------------------------------------------ export
    def _data_metadata(self) -> dict:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        classes = getattr(dm, "classes", None) if dm is not None else None
        return {"classes": [str(c) for c in classes]} if classes is not None else {}

    def export_metadata(self) -> dict[str, str]:
        """safetensors metadata: backbone name and options, classes, the segmenter's settings."""
        hp = self.hparams
        meta = {"format": "structvit", "task": "segmentation", "model": hp.model,
                "model_kwargs": json.dumps(hp.model_kwargs or {}, default=list),
                "num_classes": str(hp.num_classes), "hparams": json.dumps(dict(hp), default=str)}
        if self.run_config:
            meta["config"] = self.run_config
        meta.update({k: json.dumps(v) for k, v in self._data_metadata().items()})
        return meta

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["structvit"] = self._data_metadata()
