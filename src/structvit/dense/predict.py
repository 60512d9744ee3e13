"""``structvit predict IMAGE... --checkpoint CKPT`` for Mask R-CNN and Semantic FPN checkpoints.

Detection (:class:`structvit.engine.detection.DetectionModule`):

For every image: ``<out>/<stem>.json`` with the detections (boxes ``[x0, y0, x1, y1]`` in
pixels, labels 1..K and their class names, scores, masks as COCO compressed RLE) and
``<out>/<stem>_overlay.png``, the image with the masks, boxes and "name score" labels drawn
(torchvision's ``draw_segmentation_masks`` / ``draw_bounding_boxes``). Detections below
``--score-threshold`` are left out.

Semantic segmentation (:class:`structvit.engine.segmentation.SegmentationModule`): the image is
resized into ``--scale`` (long side, short side; ADE20K's 2048 x 512 by default) and normalised as
in evaluation, segmented (whole image or the checkpoint's sliding window) and the prediction
resized back: ``<out>/<stem>_labels.png`` holds class k as k + 1 (ADE20K's annotation
convention, 0 unused), ``<out>/<stem>.json`` the classes present with their pixel share,
``<out>/<stem>_overlay.png`` the classes drawn on the image.

The detector is rebuilt from what the checkpoint records (``.ckpt`` of ``structvit fit`` or its
``.safetensors`` export, read by :func:`structvit.checkpoint.read_checkpoint`): the backbone name
and options (checked against the registered models), the class names, the resize and the box
head width; detector options are taken only from a fixed list of numeric settings, and no
path the checkpoint names (``pretrained``) is opened.

    from structvit.dense.predict import predict_detections
    rows = predict_detections(["street.jpg"], "best.safetensors", out_dir="predictions")
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

import numpy as np
import torch

from ..data.files import DataFileError

__all__ = ["DETECTOR_OPTIONS", "is_detection_checkpoint", "is_segmentation_checkpoint", "load_detector",
           "load_segmenter", "predict_detections", "predict_segmentation", "handles", "main"]

#: torchvision MaskRCNN options a checkpoint may set, with their type
DETECTOR_OPTIONS = {
    **{f"rpn_{k}": int for k in ("pre_nms_top_n_train", "pre_nms_top_n_test", "post_nms_top_n_train",
                                 "post_nms_top_n_test", "batch_size_per_image")},
    **{f"rpn_{k}": float for k in ("nms_thresh", "fg_iou_thresh", "bg_iou_thresh", "positive_fraction",
                                   "score_thresh")},
    "box_score_thresh": float, "box_nms_thresh": float, "box_detections_per_img": int,
    "box_fg_iou_thresh": float, "box_bg_iou_thresh": float, "box_batch_size_per_image": int,
    "box_positive_fraction": float,
}


def _hyper_parameters(ckpt) -> dict:
    meta = ckpt.metadata or {}
    if ckpt.format == "safetensors":
        try:
            hp = json.loads(meta.get("hparams") or "{}")
        except json.JSONDecodeError:
            hp = {}
        return hp if isinstance(hp, dict) else {}
    return dict(meta)


def is_detection_checkpoint(ckpt) -> bool:
    """True for a checkpoint of :class:`structvit.engine.detection.DetectionModule`."""
    if (ckpt.metadata or {}).get("task") == "detection":
        return True
    hp = _hyper_parameters(ckpt)
    return "mask_threshold" in hp and "min_size" in hp


def is_segmentation_checkpoint(ckpt) -> bool:
    """True for a checkpoint of :class:`structvit.engine.segmentation.SegmentationModule`."""
    if (ckpt.metadata or {}).get("task") == "segmentation":
        return True
    hp = _hyper_parameters(ckpt)
    return "head_channels" in hp and "inference" in hp


def _int(hp: dict, key: str, default: int, path: str) -> int:
    v = hp.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 100_000:
        raise ValueError(f"checkpoint {path}: {key} must be an int in [1, 100000], got {v!r}")
    return v


def load_detector(path: str, device: str = "cpu"):
    """``(model in eval mode, class names, mask threshold)`` of the detection checkpoint ``path``."""
    from ..checkpoint import CheckpointError, read_checkpoint
    from .mask_rcnn import build_mask_rcnn

    ckpt = read_checkpoint(path)
    if not is_detection_checkpoint(ckpt):
        raise ValueError(f"checkpoint {path} is not a detection checkpoint (no Mask R-CNN settings in it)")
    hp = _hyper_parameters(ckpt)
    num_classes = _int(hp, "num_classes", ckpt.num_classes or 0, path)
    options = hp.get("detector_kwargs") or {}
    if not isinstance(options, dict):
        raise CheckpointError(f"checkpoint {path}: detector_kwargs must be a mapping")
    detector_kwargs = {}
    for key, value in options.items():
        kind = DETECTOR_OPTIONS.get(key)
        if kind is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CheckpointError(f"checkpoint {path}: detector_kwargs {key!r} is not a known numeric detector option")
        detector_kwargs[key] = kind(value)
    threshold = hp.get("mask_threshold", 0.5)
    if not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
        raise CheckpointError(f"checkpoint {path}: mask_threshold must be in [0, 1), got {threshold!r}")
    model = build_mask_rcnn(ckpt.model, num_classes + 1, min_size=_int(hp, "min_size", 800, path),
                            max_size=_int(hp, "max_size", 1333, path),
                            representation_size=_int(hp, "representation_size", 1024, path),
                            backbone_kwargs=ckpt.model_kwargs, **detector_kwargs)
    result = model.load_state_dict(ckpt.state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"checkpoint {path} does not fit the detector it describes: missing "
                              f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
    classes = ckpt.classes if ckpt.classes and len(ckpt.classes) == num_classes else [str(i) for i in range(1, num_classes + 1)]
    return model.to(device).eval(), classes, float(threshold)


def load_segmenter(path: str, device: str = "cpu"):
    """``(model in eval mode, class names, settings)`` of the segmentation checkpoint ``path``;
    settings: ``num_classes``, ``inference`` ("whole" / "slide"), ``crop_size``, ``stride``."""
    from ..checkpoint import CheckpointError, read_checkpoint
    from .semantic_fpn import build_semantic_fpn

    ckpt = read_checkpoint(path)
    if not is_segmentation_checkpoint(ckpt):
        raise ValueError(f"checkpoint {path} is not a segmentation checkpoint (no Semantic FPN settings in it)")
    hp = _hyper_parameters(ckpt)
    num_classes = _int(hp, "num_classes", ckpt.num_classes or 0, path)
    head_norm, inference = hp.get("head_norm", "bn"), hp.get("inference", "whole")
    dropout = hp.get("dropout", 0.1)
    if head_norm not in ("bn", "gn") or inference not in ("whole", "slide"):
        raise CheckpointError(f"checkpoint {path}: head_norm must be 'bn' or 'gn' and inference 'whole' or 'slide', "
                              f"got {head_norm!r}, {inference!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise CheckpointError(f"checkpoint {path}: dropout must be in [0, 1), got {dropout!r}")
    settings = {"num_classes": num_classes, "inference": inference, "crop_size": _int(hp, "crop_size", 512, path),
                "stride": _int(hp, "stride", 341, path)}
    model = build_semantic_fpn(ckpt.model, num_classes, channels=_int(hp, "head_channels", 128, path),
                               norm=head_norm, dropout=float(dropout), backbone_kwargs=ckpt.model_kwargs)
    result = model.load_state_dict(ckpt.state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"checkpoint {path} does not fit the segmenter it describes: missing "
                              f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
    classes = ckpt.classes if ckpt.classes and len(ckpt.classes) == num_classes else [f"class {i + 1}" for i in range(num_classes)]
    return model.to(device).eval(), classes, settings


def predict_segmentation(paths: Sequence[str], checkpoint: str, *, out_dir: Optional[str] = None,
                         scale: Sequence[int] = (2048, 512), device: str = "cpu") -> list[dict]:
    """Per-pixel classes of each image (see the module docstring); with ``out_dir`` the label
    PNG, JSON and overlay of each image are written there (``labels`` / ``json`` / ``overlay``)."""
    import torch.nn.functional as F
    from PIL import Image
    from torchvision.utils import draw_segmentation_masks

    from ..data.ade20k import SegEvalTransform
    from ..engine.segmentation import slide_inference

    if len(scale) != 2 or not all(isinstance(v, int) and v >= 32 for v in scale):
        raise ValueError(f"scale must be two ints >= 32 (long side, short side), got {list(scale)!r}")
    model, classes, settings = load_segmenter(checkpoint, device)
    transform = SegEvalTransform(tuple(scale))
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    rows = []
    for path in paths:
        row = {"path": str(path), "error": None}
        try:
            image = _read_image(path)
        except (OSError, ValueError, DataFileError) as err:
            rows.append({**row, "error": str(err)})
            continue
        h, w = image.shape[1:]
        normalised, _ = transform(image.float().div(255), torch.zeros(h, w))
        with torch.no_grad():
            batch = normalised[None].to(device)
            logits = (slide_inference(model, batch, settings["num_classes"], settings["crop_size"], settings["stride"])
                      if settings["inference"] == "slide" else model(batch))
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        labels = logits[0].argmax(0).cpu()
        present, counts = torch.unique(labels, return_counts=True)
        row.update(size=[h, w], classes=[{"label": int(k) + 1, "name": classes[int(k)],
                                          "fraction": round(float(c) / (h * w), 4)}
                                         for k, c in sorted(zip(present.tolist(), counts.tolist()), key=lambda t: -t[1])])
        if out_dir:
            stem = os.path.splitext(os.path.basename(str(path)))[0]
            row["labels"] = os.path.join(out_dir, f"{stem}_labels.png")
            row["json"] = os.path.join(out_dir, f"{stem}.json")
            row["overlay"] = os.path.join(out_dir, f"{stem}_overlay.png")
            Image.fromarray((labels + 1).to(torch.uint8).numpy()).save(row["labels"])
            with open(row["json"], "w", encoding="utf-8") as f:
                json.dump({k: row[k] for k in ("path", "size", "classes")}, f, indent=1)
            masks = labels[None] == present[:, None, None]
            Image.fromarray(draw_segmentation_masks(image, masks, alpha=0.5).permute(1, 2, 0).numpy()).save(row["overlay"])
        rows.append(row)
    return rows


def _read_image(path: str) -> torch.Tensor:
    """(3, H, W) uint8 (16-bit and float images scaled from their real range)."""
    from ..data.images import load_image

    return torch.from_numpy(np.array(load_image(path), dtype=np.uint8)).permute(2, 0, 1)


def predict_detections(paths: Sequence[str], checkpoint: str, *, out_dir: Optional[str] = None,
                       score_threshold: float = 0.5, device: str = "cpu") -> list[dict]:
    """Detections of each image (see the module docstring); with ``out_dir``, the JSON and
    overlay PNG of each image are written there (``json`` / ``overlay`` name them in the rows)."""
    from pycocotools import mask as mask_utils
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    if not 0 <= score_threshold <= 1:
        raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold!r}")
    model, classes, mask_threshold = load_detector(checkpoint, device)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    rows = []
    for path in paths:
        row = {"path": str(path), "error": None}
        try:
            image = _read_image(path)
        except (OSError, ValueError, DataFileError) as err:
            rows.append({**row, "error": str(err)})
            continue
        with torch.no_grad():
            det = model([image.float().div(255).to(device)])[0]
        keep = det["scores"] >= score_threshold
        boxes, labels, scores = det["boxes"][keep].cpu(), det["labels"][keep].cpu(), det["scores"][keep].cpu()
        masks = (det["masks"][keep][:, 0] > mask_threshold).cpu()
        rles = mask_utils.encode(np.asfortranarray(masks.numpy().astype(np.uint8).transpose(1, 2, 0))) if len(masks) else []
        names = [classes[int(i) - 1] for i in labels]
        row.update(size=[int(image.shape[1]), int(image.shape[2])],
                   detections=[{"box": [round(float(v), 2) for v in b], "label": int(lab), "name": name,
                                "score": round(float(s), 4),
                                "mask": {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode()}}
                               for b, lab, name, s, r in zip(boxes, labels, names, scores, rles)])
        if out_dir:
            stem = os.path.splitext(os.path.basename(str(path)))[0]
            row["json"] = os.path.join(out_dir, f"{stem}.json")
            row["overlay"] = os.path.join(out_dir, f"{stem}_overlay.png")
            with open(row["json"], "w", encoding="utf-8") as f:
                json.dump({k: row[k] for k in ("path", "size", "detections")}, f, indent=1)
            canvas = image
            if len(masks):
                canvas = draw_segmentation_masks(canvas, masks, alpha=0.45)
                canvas = draw_bounding_boxes(canvas, boxes, labels=[f"{n} {s:.2f}" for n, s in zip(names, scores)],
                                             width=2)
            from PIL import Image

            Image.fromarray(canvas.permute(1, 2, 0).numpy()).save(row["overlay"])
        rows.append(row)
    return rows


def handles(argv: Sequence[str]) -> bool:
    """Whether ``structvit predict ARGS`` names a detection checkpoint (``--checkpoint``)."""
    argv = list(argv)
    path = None
    for i, a in enumerate(argv):
        if a == "--checkpoint" and i + 1 < len(argv):
            path = argv[i + 1]
        elif a.startswith("--checkpoint="):
            path = a.split("=", 1)[1]
    if not path or not os.path.isfile(path):
        return False
    try:
        from ..checkpoint import read_checkpoint

        ckpt = read_checkpoint(path)
        return is_detection_checkpoint(ckpt) or is_segmentation_checkpoint(ckpt)
    except Exception:  # noqa: BLE001 - an unreadable file: the classification path reports it
        return False


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="structvit predict",
                                description="detection: one JSON (boxes, labels, scores, RLE masks) and one overlay "
                                            "PNG per image; segmentation: a label PNG, a JSON of the classes present "
                                            "and an overlay PNG per image")
    p.add_argument("paths", nargs="+", metavar="IMAGE")
    p.add_argument("--checkpoint", required=True, help="a .ckpt or .safetensors of `structvit fit` (detection "
                                                       "or segmentation)")
    p.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    p.add_argument("--score-threshold", type=float, default=0.5, help="detection: keep detections scoring at least this")
    p.add_argument("--scale", type=int, nargs=2, default=[2048, 512], metavar=("LONG", "SHORT"),
                   help="segmentation: resize into this long / short side first (default ADE20K's 2048 512)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        from ..checkpoint import read_checkpoint

        segmentation = os.path.isfile(args.checkpoint) and is_segmentation_checkpoint(read_checkpoint(args.checkpoint))
        if segmentation:
            rows = predict_segmentation(args.paths, args.checkpoint, out_dir=args.out, scale=args.scale,
                                        device=args.device)
        else:
            rows = predict_detections(args.paths, args.checkpoint, out_dir=args.out,
                                      score_threshold=args.score_threshold, device=args.device)
    except (ValueError, FileNotFoundError) as err:
        print(f"structvit predict: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    for r in rows:
        if r["error"]:
            print(f"structvit predict: {r['error']}", file=sys.stderr)
        elif segmentation:
            top = ", ".join(f"{c['name']} {c['fraction']:.0%}" for c in r["classes"][:3])
            print(f"{r['path']}: {top} -> {r['labels']}, {r['json']}, {r['overlay']}")
        else:
            print(f"{r['path']}: {len(r['detections'])} detection(s) -> {r['json']}, {r['overlay']}")
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
