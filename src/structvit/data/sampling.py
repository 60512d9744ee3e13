"""Which frames of a video make a clip.

Two families, as in the paper's benchmarks:

* **dense** (Kinetics, Diving-48, FineGym): ``num_frames`` frames ``frame_stride`` apart.
  Training takes one clip at a random start; testing takes ``num_clips`` clips whose
  starts are spread uniformly over the video.
* **segment** (Something-Something, TSN-style): the video is cut into ``num_frames``
  equal segments and one frame is taken per segment, at a random position in training
  and at the centre at test.  With ``num_clips > 1`` at test the position inside each
  segment is shifted by ``k / num_clips`` of a segment for clip ``k``.

A sampler returns an int64 array of shape ``(num_clips, num_frames)`` of frame indices in
``[0, num_video_frames)``.  Videos shorter than a clip repeat their last frame (dense) or
repeat frames (segment), so every clip has exactly ``num_frames`` frames.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..ops.checks import is_int

__all__ = ["FrameSampler", "dense_indices", "segment_indices", "SAMPLING_MODES"]

SAMPLING_MODES = ("dense", "segment")


def _check_positive_int(name: str, value) -> int:
    if not (is_int(value) or isinstance(value, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def dense_indices(
    num_video_frames: int,
    num_frames: int,
    frame_stride: int = 1,
    *,
    train: bool,
    num_clips: int = 1,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Dense clips: ``num_frames`` frames, ``frame_stride`` apart.

    Training: ``num_clips`` clips at independent random starts.  Test: starts spread
    uniformly from the first possible to the last possible start (one clip: the centre).
    Indices past the end are clamped to the last frame.
    """
    n = _check_positive_int("num_video_frames", num_video_frames)
    t = _check_positive_int("num_frames", num_frames)
    s = _check_positive_int("frame_stride", frame_stride)
    k = _check_positive_int("num_clips", num_clips)
    span = (t - 1) * s + 1
    max_start = max(0, n - span)
    if train:
        rng = rng if rng is not None else np.random.default_rng()
        starts = rng.integers(0, max_start + 1, size=k)
    elif k == 1:
        starts = np.array([max_start // 2])
    else:
        starts = np.round(np.linspace(0, max_start, k)).astype(np.int64)
    idx = starts[:, None] + s * np.arange(t)[None, :]
    return np.minimum(idx, n - 1).astype(np.int64)


def segment_indices(
    num_video_frames: int,
    num_frames: int,
    *,
    train: bool,
    num_clips: int = 1,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Segment-based clips: one frame from each of ``num_frames`` equal segments."""
    n = _check_positive_int("num_video_frames", num_video_frames)
    t = _check_positive_int("num_frames", num_frames)
    k = _check_positive_int("num_clips", num_clips)
    seg = n / t  # segment length in frames (may be < 1 for short videos)
    bounds = seg * np.arange(t)
    if train:
        rng = rng if rng is not None else np.random.default_rng()
        offsets = rng.random(size=(k, t)) * seg
    else:
        # clip j takes the point (j + 0.5) / k of each segment: the centre for k == 1
        frac = (np.arange(k) + 0.5) / k
        offsets = np.broadcast_to(frac[:, None] * seg, (k, t))
    idx = np.floor(bounds[None, :] + offsets).astype(np.int64)
    return np.clip(idx, 0, n - 1)


@dataclass(frozen=True)
class FrameSampler:
    """Configured sampler: ``sampler(num_video_frames, train=..., rng=...)``.

    ``num_clips`` is the number of temporal views returned at test time (training always
    returns a single clip unless ``train_clips`` says otherwise).
    """

    mode: str = "dense"
    num_frames: int = 8
    frame_stride: int = 1
    num_clips: int = 1
    train_clips: int = 1

    def __post_init__(self):
        if self.mode not in SAMPLING_MODES:
            raise ValueError(f"sampling mode must be one of {SAMPLING_MODES}, got {self.mode!r}")
        _check_positive_int("num_frames", self.num_frames)
        _check_positive_int("frame_stride", self.frame_stride)
        _check_positive_int("num_clips", self.num_clips)
        _check_positive_int("train_clips", self.train_clips)

    def __call__(self, num_video_frames: int, *, train: bool, rng: np.random.Generator | None = None) -> np.ndarray:
        k = self.train_clips if train else self.num_clips
        if self.mode == "dense":
            return dense_indices(num_video_frames, self.num_frames, self.frame_stride, train=train, num_clips=k, rng=rng)
        return segment_indices(num_video_frames, self.num_frames, train=train, num_clips=k, rng=rng)
