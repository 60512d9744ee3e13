"""Semantic FPN (Kirillov et al., Panoptic FPN's semantic branch) over a StructViT backbone.

The paper's ADE20K segmenter (Appendix C, Table 9) is UniFormer's mmseg ``EncoderDecoder``
with an ``FPN`` neck (256 channels, 4 levels) and mmseg's ``FPNHead`` (``fpn_uniformer.py``):

- per FPN level of stride s (4, 8, 16, 32): max(1, log2(s / 4)) stages of conv 3x3 (128
  channels, no bias) - norm - ReLU, each but the stride-4 level's followed by a 2x bilinear
  upsample (align_corners False), so every level reaches stride 4;
- the four stride-4 maps summed, dropout 0.1, a 1x1 classifier conv to ``num_classes``;
- logits at stride 4, upsampled bilinearly to the input size for the loss and prediction.

The norm is mmseg's config for UniFormer (``SyncBN``: ``norm="bn"``, BatchNorm here; convert
to SyncBatchNorm for multi-GPU training) or Panoptic FPN's GroupNorm (``norm="gn"``, 32 groups).

    model = build_semantic_fpn("structvit_s_4_1_h32", num_classes=150)
    logits = model(images)           # (B, 150, H, W)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import FPN_CHANNELS, FPNBackbone, build_fpn_backbone

__all__ = ["SemanticFPNHead", "SemanticFPN", "build_semantic_fpn", "HEAD_CHANNELS", "NORMS"]

#: mmseg FPNHead's width (``channels=128`` in UniFormer's and mmseg's Semantic FPN configs)
HEAD_CHANNELS = 128
NORMS = ("bn", "gn")


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "bn" else nn.GroupNorm(32, channels)


class SemanticFPNHead(nn.Module):
    """mmseg's ``FPNHead``: per-level conv-norm-ReLU (+ 2x upsample) stages to stride 4, summed, classified.

    Args:
        in_channels: FPN width (all levels).
        strides: the levels' strides, the first the finest (4, 8, 16, 32).
        num_classes: output classes.
        channels: the head's width.
        norm: "bn" (mmseg / UniFormer) or "gn" (Panoptic FPN, 32 groups).
        dropout: before the classifier (mmseg's ``dropout_ratio``).

    ``forward(maps)``: a sequence of (B, in_channels, H_s, W_s) -> (B, num_classes, H_0, W_0) logits.
    """

    def __init__(self, in_channels: int = FPN_CHANNELS, strides=(4, 8, 16, 32), num_classes: int = 150,
                 channels: int = HEAD_CHANNELS, norm: str = "bn", dropout: float = 0.1):
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        strides = tuple(strides)
        if not strides or any(s % strides[0] or (s // strides[0]) & (s // strides[0] - 1) for s in strides):
            raise ValueError(f"strides must be the finest stride times powers of 2, got {strides!r}")
        if not (0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.strides = strides
        self.num_classes = num_classes
        self.scale_heads = nn.ModuleList()
        for stride in strides:
            steps = max(1, int(math.log2(stride // strides[0])))
            layers: list[nn.Module] = []
            for k in range(steps):
                layers += [nn.Conv2d(in_channels if k == 0 else channels, channels, 3, padding=1, bias=False),
                           _norm(norm, channels), nn.ReLU(inplace=True)]
                if stride != strides[0]:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)  # mmseg's decode head init
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, maps) -> torch.Tensor:
        if len(maps) != len(self.scale_heads):
            raise ValueError(f"expected {len(self.scale_heads)} feature maps, got {len(maps)}")
        out = self.scale_heads[0](maps[0])
        for head, x in zip(self.scale_heads[1:], maps[1:]):
            # the 2x upsamples land on the finest map's size up to rounding (odd sizes): resize the rest
            out = out + F.interpolate(head(x), size=out.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv_seg(self.dropout(out))


class SemanticFPN(nn.Module):
    """Backbone + FPN (:class:`~structvit.dense.backbone.FPNBackbone`, no pool level) + :class:`SemanticFPNHead`.

    ``forward(images (B, 3, H, W))`` -> logits (B, num_classes, H, W) (the head's stride-4
    logits upsampled bilinearly to the input size, align_corners False).
    """

    def __init__(self, backbone: FPNBackbone, num_classes: int = 150, channels: int = HEAD_CHANNELS,
                 norm: str = "bn", dropout: float = 0.1):
        super().__init__()
        self.backbone = backbone
        self.head = SemanticFPNHead(backbone.out_channels, backbone.strides, num_classes, channels, norm, dropout)
        self.num_classes = num_classes

    def forward_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Stride-4 logits (B, num_classes, ceil(H / 4), ceil(W / 4)) (before the final upsample)."""
        maps = self.backbone(images)
        return self.head([maps[str(i)] for i in range(len(self.head.strides))])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4:
            raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
        logits = self.forward_logits(images)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def build_semantic_fpn(model: str = "structvit_tiny", num_classes: int = 150, *, channels: int = HEAD_CHANNELS,
                       norm: str = "bn", dropout: float = 0.1, fpn_channels: int = FPN_CHANNELS,
                       weights=None, backbone_kwargs: dict | None = None) -> SemanticFPN:
    """Semantic FPN over the registered backbone ``model``.

    Args:
        model: a registered backbone name (``structvit_s_4_1_h32``, ``structvit_tiny``, ...).
        num_classes: segmentation classes (ADE20K: 150).
        channels, norm, dropout: the head's (see :class:`SemanticFPNHead`).
        fpn_channels: the FPN's width.
        weights: ImageNet classification weights for the backbone (path or state dict).
        backbone_kwargs: the backbone's options (``drop_path_rate``, ``struct_blocks``, ...).
    """
    backbone = build_fpn_backbone(model, out_channels=fpn_channels, max_pool=False, weights=weights,
                                  **dict(backbone_kwargs or {}))
    return SemanticFPN(backbone, num_classes, channels, norm, dropout)
