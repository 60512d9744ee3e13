"""Built-in data that needs no download: ``digits``, ``moving_digits`` and ``digit_relations``.

All three are made from the 1,797 real 8x8 handwritten digits that scikit-learn ships
(``sklearn.datasets.load_digits``).  The train/validation split is by source image and
is the same for all (a fixed permutation, 20 % validation: 1,438 / 359 images).

``digit_relations`` (:func:`make_digit_relations`): images of two digits whose class is
their spatial relation (where the big digit lies relative to the small one);
a task about layouts and inter-object relations rather than appearance.

``moving_digits``: short clips (default 8 frames of 32x32 RGB) of one digit moving over a
cluttered background with moving distractor fragments.  The class is the *motion* of the
digit, never its identity:

====  =====================  ====================================================
 id    name                   motion of the digit
====  =====================  ====================================================
 0     move_left              translates right-to-left at constant speed
 1     move_right             translates left-to-right (time reverse of 0)
 2     move_up                translates bottom-to-top
 3     move_down              translates top-to-bottom (time reverse of 2)
 4     approach               grows (zooms in) geometrically
 5     recede                 shrinks (time reverse of 4)
 6     rotate_clockwise       turns clockwise as displayed (y axis down)
 7     rotate_anticlockwise   turns anticlockwise (time reverse of 6)
 8     left_then_right        goes left for half the clip, then comes back right
 9     right_then_left        goes right, then comes back left: the frames of a
                              ``left_then_right`` clip rolled by half the clip
====  =====================  ====================================================

Classes come in pairs whose target frames are *the same set of frames in another
order* (time reversal for 0-7, a half-clip roll for 8/9), so a model that ignores frame
order (e.g. averages frames) cannot beat 50 % on them; it can only tell the five pairs
apart.  The distractors (fragments of other digits, dimmer and smaller, drifting at
random constant velocities) and the background clutter are drawn independently of the
class, with time-symmetric distributions.  Everything is deterministic given ``seed``.

Difficulty (defaults, 32x32 frames): the digit is 10-13 px and moves only 0.6-1.3 px per
frame (less than one 4x4 patch of a StructViT stem), with 0.8 px of per-frame position
jitter; zoom is 4-8 % per frame, rotation 6-12 degrees per frame; three distractors and
Gaussian pixel noise (std 0.05).  ``num_distractors``, ``clutter`` and ``noise`` are
arguments of :func:`make_moving_digits`.  Generating the 1,438 training clips takes
about 2 s on one CPU core.
"""
from __future__ import annotations

import math
from functools import lru_cache

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from ..ops.checks import is_int
from .transforms import IMAGENET_MEAN, IMAGENET_STD, _check_stats

__all__ = [
    "MOVING_DIGITS_CLASSES",
    "TIME_PAIRS",
    "load_digit_images",
    "digits_split",
    "DigitsDataset",
    "make_moving_digits",
    "render_sprites",
    "moving_digits_arrays",
    "moving_digits_dataset",
    "RELATION_CLASSES",
    "make_digit_relations",
    "DigitRelationsDataset",
    "DigitRelationsDataModule",
]

MOVING_DIGITS_CLASSES = (
    "move_left", "move_right", "move_up", "move_down", "approach", "recede",
    "rotate_clockwise", "rotate_anticlockwise", "left_then_right", "right_then_left",
)
#: (class, its order-permuted twin, how): the twin's frames are the class's frames reversed / rolled
TIME_PAIRS = ((0, 1, "reverse"), (2, 3, "reverse"), (4, 5, "reverse"), (6, 7, "reverse"), (8, 9, "roll"))

VAL_FRACTION = 0.2
SPLIT_SEED = 0


@lru_cache(maxsize=1)
def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 sklearn digits as float32 images in [0, 1] ``(N, 8, 8)`` and int64 targets."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)
    images.setflags(write=False)
    return images, d.target.astype(np.int64)


def digits_split(split: str) -> np.ndarray:
    """Indices of the source images of ``split`` (``"train"`` or ``"val"``), fixed forever."""
    split = _norm_split(split)
    n = len(load_digit_images()[0])
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_val = int(round(n * VAL_FRACTION))
    return np.sort(perm[:n_val] if split == "val" else perm[n_val:])


def _norm_split(split: str) -> str:
    if not isinstance(split, str):
        raise TypeError(f"split must be a string, got {split!r}")
    s = split.lower()
    if s in ("train", "training"):
        return "train"
    if s in ("val", "valid", "validation", "test"):
        return "val"
    raise ValueError(f"split must be 'train' or 'val' for built-in data, got {split!r}")


class DigitsDataset(torch.utils.data.Dataset):
    """sklearn digits as 3-channel images ``(3, size, size)``, normalised; targets 0-9.

    ``augment`` (training) shifts each image by up to ``size // 8`` pixels.
    """

    num_classes = 10
    classes = tuple(str(i) for i in range(10))

    def __init__(self, split: str = "train", *, size: int = 32, augment: bool = False,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        if not is_int(size) or size < 8:
            raise ValueError(f"size must be an int >= 8, got {size!r}")
        self.split = _norm_split(split)
        images, targets = load_digit_images()
        idx = digits_split(self.split)
        x = torch.from_numpy(images[idx]).unsqueeze(1)  # (N, 1, 8, 8)
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
        self.images = (x * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()  # (N, 3, S, S)
        self.targets = torch.from_numpy(targets[idx])
        self.source_index = idx
        self.augment = bool(augment)
        self.size = size
        self.mean = torch.tensor(_check_stats("mean", mean)).view(3, 1, 1)
        self.std = torch.tensor(_check_stats("std", std)).view(3, 1, 1)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = self.images[i].float().div_(255)
        if self.augment:
            p = max(1, self.size // 8)
            dy, dx = (int(v) for v in torch.randint(-p, p + 1, (2,)))
            img = torch.roll(F.pad(img, (p, p, p, p)), shifts=(dy, dx), dims=(1, 2))[:, p:p + self.size, p:p + self.size]
        return (img - self.mean) / self.std, int(self.targets[i])


# --------------------------------------------------------------------------- moving digits
def render_sprites(sprites: torch.Tensor, cx, cy, side, angle, size: int) -> torch.Tensor:
    """Render square sprites onto ``size x size`` canvases.

    ``sprites``: ``(B, 1, h, w)``; ``cx, cy, side, angle``: ``(B, T)`` tensors giving, per
    frame, the sprite centre in pixels, its rendered side in pixels and its clockwise
    rotation in radians.  Returns alpha maps ``(B, T, size, size)`` in [0, 1].
    """
    b, t = cx.shape
    cos, sin = torch.cos(angle), torch.sin(angle)
    k = size / side  # output-normalised -> sprite-normalised scale
    ucx, ucy = 2 * cx / size - 1, 2 * cy / size - 1
    # q = k * R(-angle) (u - uc)
    a11, a12 = k * cos, k * sin
    a21, a22 = -k * sin, k * cos
    theta = torch.stack([
        torch.stack([a11, a12, -(a11 * ucx + a12 * ucy)], -1),
        torch.stack([a21, a22, -(a21 * ucx + a22 * ucy)], -1),
    ], -2).reshape(b * t, 2, 3)
    grid = F.affine_grid(theta, (b * t, 1, size, size), align_corners=False)
    src = sprites.repeat_interleave(t, dim=0)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.view(b, t, size, size)


def _time_op(x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Map canonical per-frame parameters ``(B, T)`` to each label's version."""
    out = x.clone()
    for _a, b, how in TIME_PAIRS:
        m = label == b
        if m.any():
            out[m] = x[m].flip(1) if how == "reverse" else x[m].roll(x.shape[1] // 2, dims=1)
    return out


def make_moving_digits(
    split: str = "train",
    *,
    seed: int = 0,
    num_frames: int = 8,
    size: int = 32,
    clips_per_image: int = 1,
    num_distractors: int = 3,
    clutter: float = 0.25,
    noise: float = 0.05,
    labels=None,
    source_index=None,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Generate moving-digits clips (in memory, deterministic from ``seed`` and ``split``).

    Returns ``clips`` uint8 ``(N, T, size, size, 3)``, ``labels`` int64 ``(N,)`` and the
    source digit index of each clip.  ``labels``/``source_index`` override the balanced
    random labels / the split's images (used by tests to render one scene under every
    class: the random draws do not depend on the labels).
    """
    for name, v, lo in (("num_frames", num_frames, 4), ("size", size, 16), ("clips_per_image", clips_per_image, 1)):
        if not is_int(v):
            raise TypeError(f"{name} must be an int, got {v!r}")
        if v < lo:
            raise ValueError(f"{name} must be >= {lo}, got {v}")
    if num_frames % 2:
        raise ValueError(f"num_frames must be even (classes 8/9 roll by half a clip), got {num_frames}")
    if not isinstance(num_distractors, int) or num_distractors < 0:
        raise ValueError(f"num_distractors must be an int >= 0, got {num_distractors!r}")
    if not 0 <= clutter <= 1 or not 0 <= noise <= 1:
        raise ValueError(f"clutter and noise must be in [0, 1], got {clutter}, {noise}")
    images, _ = load_digit_images()
    split_id = 0 if _norm_split(split) == "train" else 1
    src = digits_split(split) if source_index is None else np.asarray(source_index)
    src = np.repeat(src, clips_per_image)
    n, t, s = len(src), num_frames, float(size)
    rng = np.random.default_rng([int(seed), split_id])
    K = len(MOVING_DIGITS_CLASSES)
    if labels is None:
        lab = rng.permutation(np.arange(n) % K)
    else:
        lab = np.broadcast_to(np.asarray(labels, dtype=np.int64), (n,)).copy()
        rng.permutation(n)  # keep the random stream identical to the labelled case
        if lab.min() < 0 or lab.max() >= K:
            raise ValueError(f"labels must be in [0, {K})")
    # --- all random draws, independent of the labels --------------------------------------
    u = lambda lo, hi, shape=(n,): rng.uniform(lo, hi, size=shape)  # noqa: E731
    tt = np.arange(t, dtype=np.float64)[None, :]
    side = u(0.32, 0.42) * s  # digit side in pixels
    speed = u(0.02, 0.04) * s  # pixels per frame (0.6-1.3 px at 32 px: less than a 4x4 patch)
    perp = u(0.3, 0.7) * s  # coordinate across the motion
    frac = u(0, 1)  # where the travelled segment sits
    zoom_small = u(0.22, 0.28) * s
    zoom_rate = u(1.04, 1.08)
    zoom_c = u(0.4, 0.6, (2, n)) * s
    rot_step = np.deg2rad(u(6, 12))
    rot0 = np.deg2rad(u(-30, 30))
    rot_c = u(0.35, 0.65, (2, n)) * s
    jitter = rng.normal(0, 0.025 * s, size=(2, n, t))
    tilt = np.deg2rad(u(-10, 10))
    color = u(0.65, 1.0, (n, 3))
    # --- canonical trajectories (class 0, 2, 4, 6, 8 of each pair) --------------------------
    cx = np.empty((n, t))
    cy = np.empty((n, t))
    sd = np.repeat(side[:, None], t, 1)
    ang = np.repeat(tilt[:, None], t, 1)
    group = lab // 2
    travel = speed[:, None] * (t - 1)
    lo = side / 2 * 0.6
    hi = s - side / 2 * 0.6
    start = lo[:, None] + travel + frac[:, None] * np.maximum(hi[:, None] - lo[:, None] - travel, 0)
    lin = start - speed[:, None] * tt  # decreasing coordinate
    tri = np.minimum(tt, t - tt)  # 0, 1, ..., t/2, ..., 1: out and back
    out_back = lo[:, None] + (t // 2) * speed[:, None] + frac[:, None] * np.maximum(
        hi[:, None] - lo[:, None] - (t // 2) * speed[:, None], 0) - speed[:, None] * tri
    pp = np.repeat(perp[:, None], t, 1)
    m = group == 0  # left (x decreasing)
    cx[m], cy[m] = lin[m], pp[m]
    m = group == 1  # up (y decreasing)
    cx[m], cy[m] = pp[m], lin[m]
    m = group == 2  # approach (growing)
    cx[m], cy[m] = zoom_c[0][m, None].repeat(t, 1), zoom_c[1][m, None].repeat(t, 1)
    sd[m] = zoom_small[m, None] * zoom_rate[m, None] ** tt
    m = group == 3  # clockwise
    cx[m], cy[m] = rot_c[0][m, None].repeat(t, 1), rot_c[1][m, None].repeat(t, 1)
    ang[m] = rot0[m, None] + rot_step[m, None] * tt
    m = group == 4  # left then right
    cx[m], cy[m] = out_back[m], pp[m]
    cx += jitter[0]
    cy += jitter[1]
    lab_t = torch.from_numpy(lab)
    params = [_time_op(torch.from_numpy(p).float(), lab_t) for p in (cx, cy, sd, ang)]
    sprites = torch.from_numpy(images[src]).unsqueeze(1)
    target = render_sprites(sprites, *params, size=size)  # (n, t, S, S)
    # --- distractors: fragments of other digits drifting at constant velocity ---------------
    layers = []
    for _ in range(num_distractors):
        other = rng.integers(0, len(images), size=n)
        oy, ox = rng.integers(0, 5, size=(2, n))
        frag = np.stack([images[o, y:y + 4, x:x + 4] for o, y, x in zip(other, oy, ox)])
        d_side = u(0.2, 0.3) * s
        d0 = u(0.1, 0.9, (2, n)) * s
        dv = rng.uniform(-0.04, 0.04, size=(2, n)) * s
        d_ang = u(-math.pi, math.pi)
        dcx = torch.from_numpy(d0[0][:, None] + dv[0][:, None] * (tt - (t - 1) / 2)).float()
        dcy = torch.from_numpy(d0[1][:, None] + dv[1][:, None] * (tt - (t - 1) / 2)).float()
        alpha = render_sprites(torch.from_numpy(frag).float().unsqueeze(1), dcx, dcy,
                               torch.from_numpy(np.repeat(d_side[:, None], t, 1)).float(),
                               torch.from_numpy(np.repeat(d_ang[:, None], t, 1)).float(), size=size)
        layers.append((alpha * torch.from_numpy(u(0.4, 0.8))[:, None, None, None].float(),
                       torch.from_numpy(u(0.4, 0.9, (n, 3))).float()))
    # --- background: static low-frequency clutter + per-frame noise -------------------------
    bg_col = torch.from_numpy(u(0.0, 0.35, (n, 3))).float()
    low = torch.from_numpy(rng.random((n, 1, 6, 6))).float()
    low = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    canvas = (bg_col[:, None, None, None, :] + clutter * low[:, :, :, :, None]).expand(n, t, size, size, 3).clone()
    for alpha, col in layers:
        a = alpha[..., None]
        canvas = canvas * (1 - a) + col[:, None, None, None, :] * a
    a = target[..., None]
    canvas = canvas * (1 - a) + torch.from_numpy(color).float()[:, None, None, None, :] * a
    if noise > 0:
        canvas = canvas + noise * torch.from_numpy(rng.standard_normal((n, t, size, size, 1))).float()
    clips = (canvas.clamp(0, 1) * 255).round().to(torch.uint8)
    return clips, torch.from_numpy(lab), src


_CACHE: dict = {}


def moving_digits_arrays(split: str = "train", **kwargs):
    """:func:`make_moving_digits`, cached in memory per arguments (train and val are
    generated once per process)."""
    key = (_norm_split(split), tuple(sorted(kwargs.items())))
    if key not in _CACHE:
        if len(_CACHE) >= 4:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = make_moving_digits(split, **kwargs)
    return _CACHE[key]


class _ArrayReader:
    """Frames of in-memory clips (picklable, unlike a closure)."""

    def __init__(self, clips):
        self.clips = clips

    def __call__(self, rec, indices):
        return self.clips[int(rec.name)].index_select(0, torch.as_tensor(np.asarray(indices, dtype=np.int64)))


class _ConstCount:
    def __init__(self, n):
        self.n = n

    def __call__(self, rec):
        return self.n


def moving_digits_dataset(split: str = "train", *, sampler=None, transform=None, train: bool | None = None,
                          seed: int = 0, num_frames: int = 8, size: int = 32, clips_per_image: int = 1,
                          num_distractors: int = 3, clutter: float = 0.25, noise: float = 0.05):
    """Moving digits as a :class:`~structvit.data.video_dataset.VideoDataset` (same interface and
    sample format as the real benchmarks: ``(clip (C, T, H, W), label)``).

    Defaults: all ``num_frames`` frames in order (dense sampling, stride 1), no spatial
    augmentation (``VideoTransform(size, train=False)``: only normalisation)."""
    from .base import VideoRecord
    from .sampling import FrameSampler
    from .transforms import VideoTransform
    from .video_dataset import VideoDataset

    clips, labels, src = moving_digits_arrays(
        split, seed=seed, num_frames=num_frames, size=size, clips_per_image=clips_per_image,
        num_distractors=num_distractors, clutter=clutter, noise=noise)
    train = _norm_split(split) == "train" if train is None else bool(train)
    sampler = sampler or FrameSampler("dense", num_frames=num_frames, frame_stride=1)
    transform = transform or VideoTransform(size, train=False)
    records = [VideoRecord(path=f"moving_digits/{split}/{i:05d}", label=int(labels[i]), name=str(i))
               for i in range(len(labels))]

    ds = VideoDataset(records, classes=list(MOVING_DIGITS_CLASSES), sampler=sampler, transform=transform,
                      train=train, frame_reader=_ArrayReader(clips), frame_count=_ConstCount(num_frames))
    ds.source_index = src
    return ds


# --------------------------------------------------------------------------- digit relations
RELATION_CLASSES = ("big_left", "big_right", "big_above", "big_below")


def make_digit_relations(
    split: str = "train",
    *,
    seed: int = 0,
    size: int = 32,
    samples_per_image: int = 4,
    num_distractors: int = 0,
    clutter: float = 0.1,
    noise: float = 0.02,
    with_layout: bool = False,
):
    """Generate ``digit_relations`` images (in memory, deterministic from ``seed`` and ``split``).

    Each image shows two handwritten digits, a big one and a small one, at random places on
    a background of smooth colour clutter and pixel noise (optionally with dim digit
    fragments, ``num_distractors``). The class is a *spatial relation
    between the two objects*: where the big digit lies relative to the small one, along the
    dominant axis of their displacement:

    ====  ==========  =============================================
     id    name        the big digit is ...
    ====  ==========  =============================================
     0     big_left    left of the small one
     1     big_right   right of it
     2     big_above   above it (y axis down, as displayed)
     3     big_below   below it
    ====  ==========  =============================================

    Neither digit's appearance nor its position alone gives the class: the model has to
    find both digits, tell which is the big one and read their relative layout. At 32 px
    the big digit is 13-15 px, the small one 7-9 px (fragments, if any, 6-10 px and dimmer);
    the displacement's direction is within 30 degrees of the class's axis and its length
    is 12-17 px; the midpoint is uniform where both fit. The digits' values are random
    (the big one cycles through the split's source images ``samples_per_image`` times, the
    small one is drawn from the same split, :func:`digits_split`).

    Returns ``images`` uint8 ``(N, size, size, 3)``, ``labels`` int64 ``(N,)`` and the source
    index pairs ``(N, 2)`` (small digit, big digit); with ``with_layout`` also the digit
    centres in pixels ``(N, 2, 2)`` (small, big; x, y with y down).
    """
    for name, v, lo in (("size", size, 16), ("samples_per_image", samples_per_image, 1)):
        if not is_int(v):
            raise TypeError(f"{name} must be an int, got {v!r}")
        if v < lo:
            raise ValueError(f"{name} must be >= {lo}, got {v}")
    if not is_int(num_distractors) or num_distractors < 0:
        raise ValueError(f"num_distractors must be an int >= 0, got {num_distractors!r}")
    if not 0 <= clutter <= 1 or not 0 <= noise <= 1:
        raise ValueError(f"clutter and noise must be in [0, 1], got {clutter}, {noise}")
    images, _ = load_digit_images()
    split_id = 0 if _norm_split(split) == "train" else 1
    pool = digits_split(split)
    rng = np.random.default_rng([int(seed), split_id, 7])  # 7: another stream than moving digits
    big = np.repeat(pool, samples_per_image)
    n, s = len(big), float(size)
    K = len(RELATION_CLASSES)
    lab = rng.permutation(np.arange(n) % K)
    small = rng.choice(pool, size=n)
    u = lambda lo, hi, shape=(n,): rng.uniform(lo, hi, size=shape)  # noqa: E731
    side = np.stack([u(7 / 32, 9 / 32), u(13 / 32, 15 / 32)]) * s  # small, big
    radius = u(12 / 32, 17 / 32) * s
    axis = np.array([math.pi, 0.0, -math.pi / 2, math.pi / 2])[lab]  # left, right, up, down (y down)
    theta = axis + np.deg2rad(u(-30, 30))
    dx, dy = radius * np.cos(theta), radius * np.sin(theta)  # from the small to the big digit
    margin = 0.3 * side[1]
    lo, hi = margin, s - margin
    mx = lo + np.abs(dx) / 2 + u(0, 1) * np.maximum(hi - lo - np.abs(dx), 0)
    my = lo + np.abs(dy) / 2 + u(0, 1) * np.maximum(hi - lo - np.abs(dy), 0)
    tilt = np.deg2rad(u(-10, 10, (2, n)))
    color = u(0.65, 1.0, (2, n, 3))
    centres = ((mx - dx / 2, my - dy / 2), (mx + dx / 2, my + dy / 2))  # small, big
    # --- background and distractors (independent of the class) ---------------------------
    bg_col = torch.from_numpy(u(0.0, 0.35, (n, 3))).float()
    low = torch.from_numpy(rng.random((n, 1, 6, 6))).float()
    low = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    canvas = bg_col[:, None, None, :] + clutter * low[:, 0, :, :, None]  # (n, S, S, 3)

    def paint(canvas, sprites, cx, cy, sd, ang, col, strength=1.0):
        t1 = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64)).float()[:, None]  # noqa: E731
        alpha = render_sprites(sprites, t1(cx), t1(cy), t1(sd), t1(ang), size=size)[:, 0, :, :, None]
        alpha = alpha * torch.as_tensor(strength, dtype=torch.float32).reshape(-1, 1, 1, 1)
        return canvas * (1 - alpha) + torch.from_numpy(col).float()[:, None, None, :] * alpha

    for _ in range(num_distractors):
        other = rng.integers(0, len(images), size=n)
        oy, ox = rng.integers(0, 5, size=(2, n))
        frag = torch.from_numpy(np.stack([images[o, y:y + 4, x:x + 4] for o, y, x in zip(other, oy, ox)]))
        canvas = paint(canvas, frag.unsqueeze(1), u(0.1, 0.9) * s, u(0.1, 0.9) * s, u(0.2, 0.3) * s,
                       u(-math.pi, math.pi), u(0.4, 0.9, (n, 3)), u(0.4, 0.8))
    for k, idx in enumerate((small, big)):
        canvas = paint(canvas, torch.from_numpy(images[idx]).unsqueeze(1), centres[k][0], centres[k][1],
                       side[k], tilt[k], color[k])
    if noise > 0:
        canvas = canvas + noise * torch.from_numpy(rng.standard_normal((n, size, size, 1))).float()
    out = (canvas.clamp(0, 1) * 255).round().to(torch.uint8)
    pairs = np.stack([small, big], 1)
    if with_layout:
        return out, torch.from_numpy(lab), pairs, np.array(centres).transpose(2, 0, 1)
    return out, torch.from_numpy(lab), pairs


class DigitRelationsDataset(torch.utils.data.Dataset):
    """``digit_relations`` (see :func:`make_digit_relations`) as normalised ``(3, size, size)``
    images and targets 0-3. No augmentation: every image is drawn afresh by the generator."""

    classes = RELATION_CLASSES
    num_classes = len(RELATION_CLASSES)

    def __init__(self, split: str = "train", *, seed: int = 0, size: int = 32, samples_per_image: int = 4,
                 num_distractors: int = 0, clutter: float = 0.1, noise: float = 0.02,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.split = _norm_split(split)
        images, labels, pairs = make_digit_relations(
            self.split, seed=seed, size=size, samples_per_image=samples_per_image,
            num_distractors=num_distractors, clutter=clutter, noise=noise)
        self.images = images.permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S) uint8
        self.targets = labels
        self.source_pairs = pairs
        self.mean = torch.tensor(_check_stats("mean", mean)).view(3, 1, 1)
        self.std = torch.tensor(_check_stats("std", std)).view(3, 1, 1)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return (self.images[i].float().div_(255) - self.mean) / self.std, int(self.targets[i])


class DigitRelationsDataModule(L.LightningDataModule):
    """A Lightning data module of ``digit_relations``: training and validation loaders (the
    validation set is also the test set). ``options`` go to :func:`make_digit_relations`
    for both splits (``seed``, ``samples_per_image``, ``num_distractors``, ...)."""

    classes = list(RELATION_CLASSES)
    num_classes = len(RELATION_CLASSES)

    def __init__(self, batch_size: int = 64, num_workers: int = 0, drop_last: bool = True,
                 options: dict | None = None):
        super().__init__()
        for name, v, lo in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            if not is_int(v) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"options must be a dict of make_digit_relations arguments, got {options!r}")
        self.batch_size, self.num_workers, self.drop_last = batch_size, num_workers, bool(drop_last)
        self.options = dict(options or {})
        self._datasets: dict = {}

    def setup(self, stage=None):
        for split in ("train", "val"):
            if split not in self._datasets:
                self._datasets[split] = DigitRelationsDataset(split, **self.options)

    def _loader(self, split: str, shuffle: bool):
        self.setup()
        ds = self._datasets[split]
        return torch.utils.data.DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle,
                                           num_workers=self.num_workers,
                                           drop_last=shuffle and self.drop_last and len(ds) > self.batch_size)

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("val", False)

    def test_dataloader(self):
        return self._loader("val", False)
