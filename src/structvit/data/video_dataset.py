"""The clip dataset over reader records, and the batches of evaluation.

:class:`VideoDataset` samples frames (:mod:`.sampling`), decodes them (:mod:`.video`),
transforms the clip (:mod:`.transforms`) and returns ``(clip, label)`` with ``clip`` a
float tensor ``(C, T, H, W)``, or ``(views, label)`` with ``views`` ``(V, C, T, H, W)``,
``V = num_clips * num_crops`` (clip-major), in multi-view test mode.  A file that fails
to decode is logged with its path and counted (``num_bad_samples``); in training it is
replaced by another random sample (at most ``max_retries`` times in a row before a clear
error), in evaluation it is skipped (``__getitem__`` returns None, :func:`skip_collate`
drops it and counts it), so no sample is scored twice.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from ..ops.checks import is_int
from .base import Annotations, VideoRecord, _Counter
from .files import CorruptFileError, inside_root
from .sampling import FrameSampler
from .video import DataFileError, list_frame_files, probe_video, read_frame_folder, read_video_frames

log = logging.getLogger("structvit.data")

__all__ = ["VideoDataset", "EvalItems", "skip_collate"]


def _read_record_frames(rec: VideoRecord, sampler: FrameSampler, train: bool, rng) -> tuple[torch.Tensor, np.ndarray]:
    """Sample and decode; returns frames (K*T, H, W, 3) and the (K, T) indices (in file frames)."""
    if rec.root is not None:  # checked again: a link may have changed since the annotations were read
        inside_root(rec.path, rec.root)
    if rec.frames:
        files = list_frame_files(rec.path, root=rec.root)
        total = len(files)
    else:
        files = None
        total = probe_video(rec.path).num_frames
    start = min(max(rec.start_frame, 0), max(total - 1, 0))
    end = total if rec.end_frame is None else min(rec.end_frame, total)
    n = max(end - start, 1)
    idx = sampler(n, train=train, rng=rng) + start
    flat = idx.reshape(-1)
    frames = read_frame_folder(rec.path, flat, files=files) if rec.frames else read_video_frames(rec.path, flat)
    return frames, idx


class VideoDataset(torch.utils.data.Dataset):
    """Clips of annotated videos.

    Args:
        annotations: an :class:`Annotations` (or a list of :class:`VideoRecord` with
            ``classes``).
        sampler: a :class:`~structvit.data.sampling.FrameSampler`.
        transform: a callable mapping ``uint8 (T, H, W, 3)`` frames to ``(C, T, H, W)``
            (or ``(num_crops, C, T, H, W)``), e.g. a :class:`~.transforms.VideoTransform`.
        train: random sampling (training) or deterministic views (test).
        on_problem: what to do with annotation problems found up front: ``"warn"`` (log
            them, drop those rows) or ``"raise"``.
        max_retries: replacements tried in a row for unreadable files before giving up.
        on_unreadable: ``"replace"`` (by a random other sample) or ``"skip"`` (return
            None; :func:`skip_collate` drops it and counts it).  Default: replace in
            training, skip in evaluation (a replacement would be scored twice).
        frame_reader: ``(record, indices) -> uint8 (N, H, W, 3)`` override (in-memory data).

    Attributes the engine can read: ``num_bad_samples`` (files that failed to load, over
    all workers), ``bad_files`` (their paths, in this process), ``problems``,
    ``sample_ids`` (the record names, e.g. SSv2 video ids).
    """

    def __init__(self, annotations, *, sampler: FrameSampler, transform, train: bool, classes=None,
                 on_problem: str = "warn", max_retries: int = 10, frame_reader=None, frame_count=None,
                 on_unreadable: str | None = None):
        if on_problem not in ("warn", "raise"):
            raise ValueError(f"on_problem must be 'warn' or 'raise', got {on_problem!r}")
        if on_unreadable not in (None, "replace", "skip"):
            raise ValueError(f"on_unreadable must be 'replace', 'skip' or None, got {on_unreadable!r}")
        if not is_int(max_retries) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
        if not isinstance(sampler, FrameSampler):
            raise TypeError(f"sampler must be a FrameSampler, got {type(sampler).__name__}")
        if isinstance(annotations, Annotations):
            records, self.classes, problems = list(annotations.records), list(annotations.classes), list(annotations.problems)
        else:
            records, self.classes, problems = list(annotations), list(classes or []), []
        self.problems = problems
        if problems:
            msg = f"{len(problems)} annotation problem(s):\n  " + "\n  ".join(problems[:50]) + (
                f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else "")
            if on_problem == "raise":
                raise ValueError(msg)
            log.warning(msg)
        if not records:
            raise ValueError("the dataset has no usable samples" + (f" ({len(problems)} problems)" if problems else ""))
        self.records = records
        self.sampler = sampler
        self.transform = transform
        self.train = bool(train)
        self.on_unreadable = on_unreadable or ("replace" if self.train else "skip")
        self.max_retries = max_retries
        self._frame_reader = frame_reader
        self._frame_count = frame_count
        self._bad = _Counter()
        self.bad_files: list[str] = []
        self.last_indices = None  # frame indices of the latest sample (for tests and debugging)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_bad_samples(self) -> int:
        return self._bad.value

    @property
    def targets(self) -> list[int]:
        return [r.label for r in self.records]

    @property
    def sample_ids(self) -> list[str]:
        """One id per sample: the record's name (video id, clip name), else its path."""
        return [r.name or r.path for r in self.records]

    @property
    def num_views(self) -> int:
        if self.train:
            return self.sampler.train_clips
        crops = getattr(self.transform, "num_crops", 1)
        return self.sampler.num_clips * crops

    def __len__(self):
        return len(self.records)

    def _rng(self):
        return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))

    def load(self, index: int):
        rec = self.records[index]
        rng = self._rng()
        if self._frame_reader is not None:
            n = self._frame_count(rec)
            idx = self.sampler(n, train=self.train, rng=rng)
            frames = self._frame_reader(rec, idx.reshape(-1))
        else:
            try:
                frames, idx = _read_record_frames(rec, self.sampler, self.train, rng)
            except DataFileError:
                raise
            except Exception as e:  # a decoder failing in a way of its own: still this file's fault
                raise CorruptFileError(rec.path, f"cannot be read ({type(e).__name__}: {e})") from e
        self.last_indices = idx
        k, t = idx.shape
        clips = frames.view(k, t, *frames.shape[1:])
        views = [self.transform(c) for c in clips]
        if len(views) == 1 and views[0].ndim == 4 and self.num_views == 1:
            return views[0], rec.label
        out = torch.cat([v if v.ndim == 5 else v.unsqueeze(0) for v in views])
        return out, rec.label

    def __getitem__(self, index: int):
        if self.on_unreadable == "skip":
            try:
                return self.load(index)
            except DataFileError as e:
                self._bad.add()
                self.bad_files.append(e.path)
                log.warning("unreadable sample %d skipped: %s", index, e)
                return None
        tried = []
        seen: set[int] = set()
        i = index
        for attempt in range(self.max_retries + 1):
            try:
                return self.load(i)
            except DataFileError as e:
                self._bad.add()
                self.bad_files.append(e.path)
                tried.append(str(e))
                seen.add(i)
                if len(seen) >= len(self):
                    break
                if self.train:  # another random sample, not one that already failed
                    j = int(torch.randint(0, len(self), (1,)).item())
                    while j in seen:
                        j = int(torch.randint(0, len(self), (1,)).item())
                else:
                    j = (i + 1) % len(self)
                log.warning("unreadable sample %d: %s; replaced by sample %d (attempt %d of %d)",
                            i, e, j, attempt + 1, self.max_retries)
                i = j
        raise RuntimeError(f"sample {index}: {len(tried)} unreadable files in a row, giving up "
                           f"(max_retries={self.max_retries}):\n  " + "\n  ".join(tried))


# --------------------------------------------------------------------------- evaluation batches
class EvalItems(torch.utils.data.Dataset):
    """Prediction view of a dataset: item ``i`` is ``(x, y, i)``, or None for a sample the
    dataset skipped (unreadable).  With :func:`skip_collate` the batches carry the dataset
    indices of their samples (for the file ids of predictions) and the number skipped."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        return None if item is None else (item[0], item[1], index)


def skip_collate(items: list) -> list:
    """Evaluation batches without the samples a dataset skipped (None items).

    Items ``(x, y)`` give ``[x, y]``; :class:`EvalItems` items ``(x, y, index)`` give
    ``[x, y, index, skipped]`` with ``skipped`` the number of None items (a 0-d long
    tensor).  ``x`` is None (and ``y``, ``index`` empty) when every sample was skipped."""
    from torch.utils.data import default_collate

    kept = [it for it in items if it is not None]
    with_index = any(isinstance(it, tuple) and len(it) == 3 for it in kept) or not kept
    skipped = torch.tensor(len(items) - len(kept), dtype=torch.long)
    if not kept:
        empty = torch.zeros(0, dtype=torch.long)
        return [None, empty, empty, skipped]
    out = list(default_collate(kept))
    return out + [skipped] if with_index else out

