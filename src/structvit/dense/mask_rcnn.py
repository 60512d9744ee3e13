"""Mask R-CNN over a StructViT backbone (the paper's Appendix C detector, Table 8).

torchvision's :class:`~torchvision.models.detection.MaskRCNN` with the feature pyramid of
``maskrcnn_resnet50_fpn``: four stage maps (strides 4, 8, 16, 32) into a 256-channel FPN
with a max-pooled fifth level (``LastLevelMaxPool``, stride 64), anchors 32-512 (one size
per level, ratios 0.5/1/2), 7x7 box and 14x14 mask RoIAlign over levels ``'0'``-``'3'``.
Images are resized inside the model (shorter side ``min_size`` = 800, longer side at most
``max_size`` = 1333, keeping the ratio) and normalised with the backbone's
``pretrained_cfg`` mean and std.

    model = build_mask_rcnn("structvit_s_4_1_h14", num_classes=81)   # COCO: 80 + background
    losses = model(images, targets)          # training: dict of the five losses
    detections = model(images)               # eval: boxes, labels, scores, masks per image
"""
from __future__ import annotations

from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

from .backbone import FPN_CHANNELS, build_fpn_backbone

__all__ = ["build_mask_rcnn", "count_parameters"]


def build_mask_rcnn(model: str = "structvit_tiny", num_classes: int = 81, *, min_size: int = 800,
                    max_size: int = 1333, representation_size: int = 1024, backbone_kwargs: dict | None = None,
                    **detector_kwargs) -> MaskRCNN:
    """torchvision's Mask R-CNN over the FPN of backbone ``model``.

    Args:
        model: a registered backbone name (e.g. ``structvit_s_4_1_h14``, ``structvit_tiny``).
        num_classes: object classes plus one for the background (COCO: 81).
        min_size, max_size: the resize done inside the model (shorter / longer side bound).
        representation_size: width of the box head's two fully connected layers (1024 in
            torchvision's and mmdet's Mask R-CNN; smaller for CPU-scale experiments).
        backbone_kwargs: passed to the backbone's constructor (e.g. ``drop_path_rate``).
        detector_kwargs: passed to :class:`~torchvision.models.detection.MaskRCNN`
            (e.g. ``box_detections_per_img``).
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2 (object classes + background), got {num_classes!r}")
    for arg, value in (("min_size", min_size), ("max_size", max_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 32:
            raise ValueError(f"{arg} must be an int >= 32, got {value!r}")
    if not isinstance(representation_size, int) or isinstance(representation_size, bool) or representation_size < 1:
        raise ValueError(f"representation_size must be a positive int, got {representation_size!r}")
    if max_size < min_size:
        raise ValueError(f"max_size must be >= min_size ({min_size}), got {max_size}")
    backbone = build_fpn_backbone(model, out_channels=FPN_CHANNELS, max_pool=True, **dict(backbone_kwargs or {}))
    cfg = _pretrained_cfg(backbone)
    resolution = 7  # the box RoIAlign's output (torchvision's MultiScaleRoIAlign default)
    box_head = TwoMLPHead(backbone.out_channels * resolution ** 2, representation_size)
    return MaskRCNN(backbone, num_classes=None, min_size=min_size, max_size=max_size,
                    image_mean=list(cfg["mean"]), image_std=list(cfg["std"]), box_head=box_head,
                    box_predictor=FastRCNNPredictor(representation_size, num_classes),
                    mask_predictor=MaskRCNNPredictor(FPN_CHANNELS, FPN_CHANNELS, num_classes), **detector_kwargs)


def _pretrained_cfg(backbone: nn.Module) -> dict:
    for m in backbone.modules():
        cfg = getattr(m, "pretrained_cfg", None)
        if cfg and "mean" in cfg:
            return cfg
    raise ValueError("the backbone carries no pretrained_cfg with the image mean and std")


def count_parameters(module: nn.Module) -> int:
    """Parameters of ``module`` (each shared tensor once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())
