"""Clip-consistent video transforms and the image transforms (timm).

A video transform takes the decoded frames of one clip, a ``uint8`` tensor
``(T, H, W, 3)``, and returns a normalised ``float32`` tensor ``(C, T, H, W)``, or
``(num_crops, C, T, H, W)`` when several spatial crops are asked for at test time.
Every random choice (crop box, flip, RandAugment operations and magnitudes, erased
rectangle) is drawn once per clip and applied to every frame, so motion is preserved.
"""
from __future__ import annotations

import math
import random
import re
from typing import Sequence

import torch
import torch.nn.functional as F

from ..ops.checks import is_int

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VideoTransform",
    "parse_randaugment",
    "spatial_crop_boxes",
    "build_image_transform",
    "CROP_MODES",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_MODES = ("random_resized", "multi_scale", "center")


def _check_stats(name, value) -> tuple[float, ...]:
    try:
        t = tuple(float(v) for v in value)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of 3 floats, got {value!r}") from None
    if len(t) != 3:
        raise ValueError(f"{name} must have 3 values (RGB), got {len(t)}")
    if name == "std" and min(t) <= 0:
        raise ValueError(f"std must be positive, got {t}")
    return t


def parse_randaugment(spec) -> tuple[int, int] | None:
    """``None``/``False``/``""`` -> off; ``True`` -> (2 ops, magnitude 9);
    ``"rand-m9-n2"`` (timm-style, other fields ignored) -> (n, m)."""
    if spec is None or spec is False or spec == "" or spec == "none":
        return None
    if spec is True:
        return 2, 9
    if not isinstance(spec, str):
        raise TypeError(f"randaugment must be a bool or a string like 'rand-m9-n2', got {spec!r}")
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"randaugment must look like 'rand-m9-n2', got {spec!r}")
    n, m = 2, 9
    for p in parts[1:]:
        if re.fullmatch(r"m\d+", p):
            m = int(p[1:])
        elif re.fullmatch(r"n\d+", p):
            n = int(p[1:])
    if not 0 <= m <= 30:
        raise ValueError(f"randaugment magnitude must be in [0, 30], got {m}")
    return n, m


def spatial_crop_boxes(height: int, width: int, size: int, num_crops: int) -> list[tuple[int, int]]:
    """Top-left corners of ``num_crops`` square crops of side ``size``, spread evenly
    along the longer side (1: centre; 3: start, centre, end), centred on the other."""
    if num_crops < 1:
        raise ValueError(f"num_crops must be >= 1, got {num_crops}")
    cy, cx = (height - size) // 2, (width - size) // 2
    if num_crops == 1:
        return [(cy, cx)]
    if width >= height:
        xs = [round(i * (width - size) / (num_crops - 1)) for i in range(num_crops)]
        return [(cy, x) for x in xs]
    ys = [round(i * (height - size) / (num_crops - 1)) for i in range(num_crops)]
    return [(y, cx) for y in ys]


def _resize(clip: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a (T, C, H, W) uint8 clip; bilinear with antialiasing."""
    if tuple(clip.shape[-2:]) == tuple(size):
        return clip
    out = F.interpolate(clip.float(), size=size, mode="bilinear", align_corners=False,
                        antialias=clip.shape[-2] > size[0] or clip.shape[-1] > size[1])
    return out.round_().clamp_(0, 255).to(torch.uint8)


class VideoTransform:
    """Clip-consistent transform for training or testing.

    Args:
        input_size: side of the square output.
        train: training (random crop, flip, RandAugment, erasing) or test (resize the short
            side to ``test_short_side``, then ``num_crops`` crops).
        crop: training crop, ``"random_resized"`` (area ``scale``, aspect ``ratio``),
            ``"multi_scale"`` (TSN: sides from ``scales`` x short side, corner or centre
            positions) or ``"center"``.
        flip: horizontal flip with probability 0.5 in training.  Keep it off for
            Something-Something (labels say left/right) and moving digits.
        randaugment: ``None`` or e.g. ``"rand-m9-n2"``; one draw of operations and
            magnitudes per clip (torchvision's RandAugment on the whole clip tensor).
        random_erasing: probability of erasing one rectangle (same on all frames).
        mean, std: normalisation, in [0, 1] units.
        num_crops: spatial crops at test (>1 returns ``(num_crops, C, T, H, W)``).
        test_short_side: short side before test crops (default ``input_size``).
    """

    def __init__(
        self,
        input_size: int = 224,
        *,
        train: bool,
        crop: str = "random_resized",
        scale: Sequence[float] = (0.25, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        scales: Sequence[float] = (1.0, 0.875, 0.75, 0.66),
        flip: bool = False,
        randaugment=None,
        random_erasing: float = 0.0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        num_crops: int = 1,
        test_short_side: int | None = None,
    ):
        if not is_int(input_size):
            raise TypeError(f"input_size must be an int, got {input_size!r}")
        if input_size < 1:
            raise ValueError(f"input_size must be >= 1, got {input_size}")
        if crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {CROP_MODES}, got {crop!r}")
        if not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must be (min, max) with 0 < min <= max <= 1, got {scale!r}")
        if not (len(ratio) == 2 and 0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must be (min, max) with 0 < min <= max, got {ratio!r}")
        if not 0.0 <= float(random_erasing) <= 1.0:
            raise ValueError(f"random_erasing must be a probability in [0, 1], got {random_erasing}")
        if not is_int(num_crops) or num_crops < 1:
            raise ValueError(f"num_crops must be an int >= 1, got {num_crops!r}")
        self.input_size = input_size
        self.train = bool(train)
        self.crop = crop
        self.scale = tuple(float(s) for s in scale)
        self.ratio = tuple(float(r) for r in ratio)
        self.scales = tuple(float(s) for s in scales)
        self.flip = bool(flip)
        self.randaugment = parse_randaugment(randaugment)
        self.random_erasing = float(random_erasing)
        self.mean = torch.tensor(_check_stats("mean", mean)).view(3, 1, 1, 1)
        self.std = torch.tensor(_check_stats("std", std)).view(3, 1, 1, 1)
        self.num_crops = num_crops
        self.test_short_side = int(test_short_side or input_size)
        if self.test_short_side < input_size:
            raise ValueError(f"test_short_side ({self.test_short_side}) must be >= input_size ({input_size})")
        self._ra = None
        if self.randaugment is not None:
            from torchvision.transforms import v2

            n, m = self.randaugment
            self._ra = v2.RandAugment(num_ops=n, magnitude=m)

    def __repr__(self):
        return (f"VideoTransform(input_size={self.input_size}, train={self.train}, crop={self.crop!r}, "
                f"flip={self.flip}, randaugment={self.randaugment}, random_erasing={self.random_erasing}, "
                f"num_crops={self.num_crops})")

    # -- crop boxes -------------------------------------------------------------------
    def _random_resized_box(self, h: int, w: int) -> tuple[int, int, int, int]:
        area = h * w
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            a = area * random.uniform(*self.scale)
            r = math.exp(random.uniform(*log_r))
            cw, ch = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
            if 0 < cw <= w and 0 < ch <= h:
                return random.randint(0, h - ch), random.randint(0, w - cw), ch, cw
        s = min(h, w)  # fallback: central square
        return (h - s) // 2, (w - s) // 2, s, s

    def _multi_scale_box(self, h: int, w: int) -> tuple[int, int, int, int]:
        base = min(h, w)
        sizes = [max(1, int(base * s)) for s in self.scales]
        pairs = [(i, j) for i in range(len(sizes)) for j in range(len(sizes)) if abs(i - j) <= 1]
        i, j = random.choice(pairs)
        ch, cw = sizes[i], sizes[j]
        dy, dx = (h - ch) // 4, (w - cw) // 4
        offsets = [(0, 0), (0, 4 * dx), (4 * dy, 0), (4 * dy, 4 * dx), (2 * dy, 2 * dx)]
        y, x = random.choice(offsets)
        return y, x, ch, cw

    # -- pipeline -----------------------------------------------------------------------
    def _finish(self, clip: torch.Tensor) -> torch.Tensor:
        """uint8 (T, C, H, W) -> normalised float (C, T, H, W)."""
        x = clip.permute(1, 0, 2, 3).float().div_(255.0)
        return (x - self.mean) / self.std

    def _erase(self, x: torch.Tensor) -> torch.Tensor:
        if self.random_erasing <= 0 or random.random() >= self.random_erasing:
            return x
        _, _, h, w = x.shape
        for _ in range(10):
            a = h * w * random.uniform(0.02, 1 / 3)
            r = math.exp(random.uniform(math.log(0.3), math.log(1 / 0.3)))
            eh, ew = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
            if 0 < eh < h and 0 < ew < w:
                y, x0 = random.randint(0, h - eh), random.randint(0, w - ew)
                noise = torch.randn(x.shape[0], 1, eh, ew, dtype=x.dtype)
                x[:, :, y:y + eh, x0:x0 + ew] = noise  # same rectangle and values on every frame
                return x
        return x

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise TypeError("frames must be a uint8 tensor of shape (T, H, W, 3)")
        clip = frames.permute(0, 3, 1, 2)  # (T, C, H, W)
        h, w = clip.shape[-2:]
        s = self.input_size
        if self.train:
            if self.crop == "random_resized":
                y, x, ch, cw = self._random_resized_box(h, w)
            elif self.crop == "multi_scale":
                y, x, ch, cw = self._multi_scale_box(h, w)
            else:
                side = min(h, w)
                y, x, ch, cw = (h - side) // 2, (w - side) // 2, side, side
            clip = _resize(clip[:, :, y:y + ch, x:x + cw], (s, s))
            if self.flip and random.random() < 0.5:
                clip = clip.flip(-1)
            if self._ra is not None:
                clip = self._ra(clip.contiguous())  # one draw for the whole (T, C, H, W) tensor
            return self._erase(self._finish(clip))
        # test: short side -> test_short_side, then num_crops square crops
        short = self.test_short_side
        nh, nw = (short, max(short, round(w * short / h))) if h <= w else (max(short, round(h * short / w)), short)
        clip = _resize(clip, (nh, nw))
        boxes = spatial_crop_boxes(nh, nw, s, self.num_crops)
        views = [self._finish(clip[:, :, y:y + s, x:x + s]) for y, x in boxes]
        return views[0] if self.num_crops == 1 else torch.stack(views)


def build_image_transform(
    input_size: int = 224,
    *,
    train: bool,
    randaugment="rand-m9-mstd0.5-inc1",
    random_erasing: float = 0.25,
    hflip: float = 0.5,
    scale: Sequence[float] = (0.08, 1.0),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_pct: float | None = None,
    interpolation: str = "bicubic",
):
    """timm's ``create_transform`` with the DeiT/UniFormer recipe (RandAugment, random
    erasing, random resized crop; eval: resize + centre crop)."""
    from timm.data import create_transform

    mean, std = _check_stats("mean", mean), _check_stats("std", std)
    if not 0.0 <= float(random_erasing) <= 1.0:
        raise ValueError(f"random_erasing must be a probability in [0, 1], got {random_erasing}")
    if randaugment is True:
        randaugment = "rand-m9-mstd0.5-inc1"
    if randaugment in (False, "", "none"):
        randaugment = None
    if randaugment is not None and not isinstance(randaugment, str):
        raise TypeError(f"randaugment must be a timm auto-augment string or None, got {randaugment!r}")
    if train:
        return create_transform(
            input_size, is_training=True, auto_augment=randaugment, re_prob=float(random_erasing),
            re_mode="pixel", re_count=1, hflip=float(hflip), scale=tuple(scale), interpolation=interpolation,
            mean=mean, std=std,
        )
    return create_transform(input_size, is_training=False, interpolation=interpolation, mean=mean, std=std,
                            crop_pct=crop_pct if crop_pct is not None else (0.875 if input_size >= 64 else 1.0))
