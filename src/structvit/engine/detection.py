"""Detection and instance segmentation training: :class:`DetectionModule` (Mask R-CNN).

Trains torchvision's Mask R-CNN over a StructViT backbone (:mod:`structvit.dense.mask_rcnn`)
on ``(images, targets)`` lists (:class:`structvit.data.coco.CocoDataModule`): the loss is the
sum of torchvision's five losses (RPN objectness and box, RoI classification, box and mask).
Validation and test run COCO's own evaluation (pycocotools ``COCOeval``) against the split's
annotation file, crowd regions included, and log box and mask AP, AP50, AP75 and AP for
small / medium / large objects, in percent as Table 8 of the paper reports them
(``val/box_ap``, ``val/mask_ap50``, ...).

Optimiser (the paper's 1x recipe, UniFormer's Mask R-CNN config): AdamW, no weight decay on
norms, biases and position tables; the learning rate starts with mmdet's linear warm-up
(``warmup_iters`` steps from ``warmup_ratio``) and is multiplied by ``lr_gamma`` at each epoch
of ``lr_steps``.

    structvit fit --config configs/coco_maskrcnn_structvit_s_4_1_h14.yaml --data.root /data/coco
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Optional, Sequence

import lightning as L
import numpy as np
import torch

from ..dense.mask_rcnn import build_mask_rcnn
from .optim import param_groups

__all__ = ["DetectionModule", "StepSchedule", "coco_results", "coco_evaluate", "COCO_METRICS"]

#: COCOeval's first six statistics, in its order
COCO_METRICS = ("ap", "ap50", "ap75", "aps", "apm", "apl")


class StepSchedule:
    """LR multiplier at optimiser step ``s`` (a picklable callable for ``LambdaLR``).

    mmdet's step policy: ``lr_gamma ** (epochs of lr_steps passed)``, the epoch being
    ``s // steps_per_epoch``; during the first ``warmup_iters`` steps it is further scaled
    linearly from ``warmup_ratio`` to 1 (``1 - (1 - s / warmup_iters) * (1 - warmup_ratio)``).
    """

    def __init__(self, steps_per_epoch: int, lr_steps: Sequence[int] = (8, 11), lr_gamma: float = 0.1,
                 warmup_iters: int = 500, warmup_ratio: float = 0.001):
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.steps_per_epoch, self.lr_steps, self.lr_gamma = int(steps_per_epoch), tuple(lr_steps), float(lr_gamma)
        self.warmup_iters, self.warmup_ratio = int(warmup_iters), float(warmup_ratio)

    def __call__(self, step: int) -> float:
        epoch = step // self.steps_per_epoch
        factor = self.lr_gamma ** sum(epoch >= s for s in self.lr_steps)
        if step < self.warmup_iters:
            factor *= 1.0 - (1.0 - step / self.warmup_iters) * (1.0 - self.warmup_ratio)
        return factor


def coco_results(detections: Sequence[dict], image_ids: Sequence[int], label_to_category: dict,
                 mask_threshold: float = 0.5) -> tuple[list[dict], list[dict]]:
    """torchvision detections (boxes xyxy in the original image, labels 1..K, scores, masks
    (N, 1, H, W) probabilities) as COCO result lists ``(boxes, segmentations)``: boxes
    [x, y, w, h], COCO category ids, RLE masks of the pixels above ``mask_threshold``."""
    from pycocotools import mask as mask_utils

    boxes_out, masks_out = [], []
    for det, image_id in zip(detections, image_ids):
        boxes = det["boxes"].detach().float().cpu()
        if boxes.numel() == 0:
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
        cats = [label_to_category[int(v)] for v in det["labels"].tolist()]
        scores = det["scores"].detach().float().cpu().tolist()
        for box, cat, score in zip(xywh, cats, scores):
            boxes_out.append({"image_id": int(image_id), "category_id": cat, "bbox": box, "score": score})
        if "masks" in det:
            binary = (det["masks"][:, 0] > mask_threshold).cpu().numpy().astype(np.uint8)
            rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
            for rle, cat, score in zip(rles, cats, scores):
                rle["counts"] = rle["counts"].decode()
                masks_out.append({"image_id": int(image_id), "category_id": cat, "segmentation": rle, "score": score})
    return boxes_out, masks_out


def coco_evaluate(coco_gt, results: list[dict], iou_type: str, image_ids: Sequence[int]) -> dict[str, float]:
    """COCOeval's AP, AP50, AP75, APs, APm, APl (percent) of ``results`` on ``image_ids``
    (``iou_type`` ``"bbox"`` or ``"segm"``); all 0 when there is no detection."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {k: 0.0 for k in COCO_METRICS}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and table
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.params.imgIds = sorted(set(int(i) for i in image_ids))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # COCOeval's -1 means "no ground truth of this size": logged as 0 (a metric must be a number)
    return {k: max(float(v), 0.0) * 100 for k, v in zip(COCO_METRICS, ev.stats[:6])}


class DetectionModule(L.LightningModule):
    """Mask R-CNN training and COCO evaluation (see the module docstring).

    Args:
        model: the backbone, any registered name (``structvit_s_4_1_h14``, ``structvit_tiny``).
        num_classes: object categories without the background (COCO: 80); the data module's.
        model_kwargs: options of the backbone (e.g. ``drop_path_rate``).
        pretrained: a ``.safetensors`` / ``.ckpt`` of the backbone's classifier (ImageNet)
            loaded into the backbone (its head left out).
        min_size, max_size: the detector's resize (shorter side, longer side bound).
        representation_size: the box head's width (1024: torchvision's and mmdet's).
        detector_kwargs: other options of torchvision's ``MaskRCNN`` (e.g.
            ``box_batch_size_per_image``).
        lr, weight_decay, betas: AdamW.
        lr_steps, lr_gamma: epochs at which the learning rate is multiplied by ``lr_gamma``.
        warmup_iters, warmup_ratio: mmdet's linear warm-up (optimiser steps, start factor).
        mask_threshold: a mask pixel belongs to the object above this probability.
    """

    def __init__(self, model: str = "structvit_tiny", num_classes: int = 80, model_kwargs: Optional[dict] = None,
                 pretrained: Optional[str] = None, min_size: int = 800, max_size: int = 1333,
                 representation_size: int = 1024, detector_kwargs: Optional[dict] = None, lr: float = 1e-4,
                 weight_decay: float = 0.05, betas: Sequence[float] = (0.9, 0.999),
                 lr_steps: Sequence[int] = (8, 11), lr_gamma: float = 0.1,
                 warmup_iters: int = 500, warmup_ratio: float = 0.001, mask_threshold: float = 0.5):
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int (object categories), got {num_classes!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if not 0 <= mask_threshold < 1:
            raise ValueError(f"mask_threshold must be in [0, 1), got {mask_threshold!r}")
        if any(not isinstance(s, int) or s < 0 for s in lr_steps):
            raise ValueError(f"lr_steps must be epochs (ints >= 0), got {list(lr_steps)!r}")
        self.save_hyperparameters()
        self.model = build_mask_rcnn(model, num_classes + 1, min_size=min_size, max_size=max_size,
                                     representation_size=representation_size, backbone_kwargs=model_kwargs or {},
                                     **dict(detector_kwargs or {}))
        if pretrained:
            self.load_backbone(pretrained)
        self.run_config: Optional[str] = None
        self._results: dict[str, list] = {}

    # ------------------------------------------------------------------ weights
    def load_backbone(self, path: str) -> list[str]:
        """Load a classifier checkpoint of the backbone (``structvit fit``'s ``.safetensors``, a
        converted or original UniFormer file) into the detector's backbone; returns the backbone
        tensors it did not provide (the stage norms of a dense backbone start fresh)."""
        from ..dense.backbone import load_classification_weights

        return list(load_classification_weights(self.model.backbone.body, path).missing)

    # ------------------------------------------------------------------ data checks
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        n = getattr(dm, "num_classes", None)
        if n is not None and n != self.hparams.num_classes:
            raise ValueError(f"model.num_classes is {self.hparams.num_classes} but the dataset has {n} categories")

    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        """Detections of images (each (3, H, W) in [0, 1]) in their own pixel frame."""
        return self.model(images)

    # ------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx):
        images, targets = batch
        losses = self.model(images, [{k: v for k, v in t.items() if k in ("boxes", "labels", "masks")}
                                     for t in targets])
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            from .module import NonFiniteLossError

            raise NonFiniteLossError(f"non-finite detection loss at step {self.global_step}: "
                                     + ", ".join(f"{k} {float(v):.4g}" for k, v in losses.items()))
        bs = len(images)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for name, value in losses.items():
            self.log(f"train/{name}", value, batch_size=bs)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=bs)
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(param_groups(self.model, hp.weight_decay), lr=hp.lr, betas=tuple(hp.betas))
        steps_per_epoch = self._steps_per_epoch()
        schedule = StepSchedule(steps_per_epoch, hp.lr_steps, hp.lr_gamma, hp.warmup_iters, hp.warmup_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _steps_per_epoch(self) -> int:
        trainer = self.trainer
        batches = trainer.num_training_batches
        if not np.isfinite(batches) or batches <= 0:
            total, epochs = trainer.estimated_stepping_batches, trainer.max_epochs
            return max(1, int(total // epochs)) if epochs and epochs > 0 and np.isfinite(total) else 1
        return max(1, int(batches // max(1, trainer.accumulate_grad_batches)))

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch, stage: str) -> None:
        images, targets = batch
        detections = self.model(images)
        dataset = self._dataset(stage)
        ids = [t["image_id"] for t in targets]
        boxes, masks = coco_results(detections, ids, dataset.label_to_category, self.hparams.mask_threshold)
        store = self._results.setdefault(stage, [[], [], []])
        store[0] += ids
        store[1] += boxes
        store[2] += masks

    def _dataset(self, stage: str):
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "dataset"):
            raise ValueError("detection evaluation needs a data module with dataset(stage) giving the COCO annotations "
                             "(structvit.data.coco.CocoDataModule)")
        return dm.dataset(stage)

    def _evaluate(self, stage: str) -> dict[str, float]:
        ids, boxes, masks = self._results.pop(stage, [[], [], []])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (ids, boxes, masks))
            ids = [i for g in gathered for i in g[0]]
            boxes = [b for g in gathered for b in g[1]]
            masks = [m for g in gathered for m in g[2]]
        if not ids:
            return {}
        coco_gt = self._dataset(stage).coco
        metrics = {f"box_{k}": v for k, v in coco_evaluate(coco_gt, boxes, "bbox", ids).items()}
        metrics.update({f"mask_{k}": v for k, v in coco_evaluate(coco_gt, masks, "segm", ids).items()})
        prefix = "val" if stage == "val" else "test"
        for name, value in metrics.items():
            self.log(f"{prefix}/{name}", value, rank_zero_only=True, sync_dist=False)
        self.log(f"{prefix}/images", float(len(set(ids))), rank_zero_only=True)
        return metrics

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self._results.pop("val", None)

    def on_test_epoch_start(self) -> None:
        self._results.pop("test", None)

    def on_validation_epoch_end(self) -> None:
        self._evaluate("val")

    def on_test_epoch_end(self) -> None:
        self._evaluate("test")

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0):
        """COCO result entries (boxes and RLE segmentations, category ids) of the batch's images."""
        images, targets = batch
        ids = [t["image_id"] for t in targets]
        dataset = self._dataset("test")
        boxes, masks = coco_results(self.model(images), ids, dataset.label_to_category, self.hparams.mask_threshold)
        return {"image_ids": ids, "bbox": boxes, "segm": masks}

    def write_predictions(self, out_dir: str, batches, rank: int = 0, world_size: int = 1) -> str:
        """``detections_bbox.json`` and ``detections_segm.json`` in COCO's results format (the
        format of a COCO test-dev submission); returns the line the CLI prints."""
        suffix = "" if world_size == 1 else f"_rank{rank}"
        images = sum(len(b["image_ids"]) for b in batches if b)
        paths = []
        for kind in ("bbox", "segm"):
            path = os.path.join(out_dir, f"detections_{kind}{suffix}.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump([r for b in batches if b for r in b[kind]], f)
            paths.append(path)
        return f"detections of {images} images written to {' and '.join(paths)} (COCO results format)"

    # ------------------------------------------------------------------ export
    def _data_metadata(self) -> dict:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        classes = getattr(dm, "classes", None) if dm is not None else None
        return {"classes": [str(c) for c in classes]} if classes is not None else {}

    def export_metadata(self) -> dict[str, str]:
        """safetensors metadata: backbone name and options, classes, the detector's settings."""
        hp = self.hparams
        meta = {"format": "structvit", "task": "detection", "model": hp.model,
                "model_kwargs": json.dumps(hp.model_kwargs or {}, default=list),
                "num_classes": str(hp.num_classes), "hparams": json.dumps(dict(hp), default=str)}
        if self.run_config:
            meta["config"] = self.run_config
        meta.update({k: json.dumps(v) for k, v in self._data_metadata().items()})
        return meta

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["structvit"] = self._data_metadata()
