"""What every dataset reader shares: the records it returns, the split names, finding
annotation files and media under the dataset root, and the counter of unreadable samples.

A reader turns official annotation files into :class:`Annotations`: a list of
:class:`VideoRecord` (file or frame folder, label, frame range), the class names in label
order (from the official files, never from folder order) and the problems found (unknown
labels, missing files, malformed rows), each naming its file and row.  Records of splits
without labels (the Kinetics-400 test CSV, SSv2's ``test.json``) have the label
:data:`UNLABELLED` (-1): they serve prediction only.
"""
from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass, field

__all__ = ["VideoRecord", "Annotations", "normalize_split", "VIDEO_EXTENSIONS", "UNLABELLED", "BENCHMARK_CLASSES"]

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov")
#: the label of a record whose split has no labels (prediction only)
UNLABELLED = -1
#: the number of classes of each benchmark (``structvit data check`` flags another count)
BENCHMARK_CLASSES = {"kinetics400": 400, "ssv2": 174, "ssv1": 174, "diving48": 48, "gym99": 99, "gym288": 288,
                     "imagenet": 1000}


@dataclass
class VideoRecord:
    """One annotated video: a file (``frames=False``) or a folder of frames."""

    path: str
    label: int
    start_frame: int = 0
    end_frame: int | None = None  # exclusive; None = to the end
    frames: bool = False
    name: str = ""


@dataclass
class Annotations:
    records: list[VideoRecord]
    classes: list[str]
    problems: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labelled(self) -> bool:
        """False if any record has no label (:data:`UNLABELLED`)."""
        return all(r.label != UNLABELLED for r in self.records)


def normalize_split(split: str) -> str:
    if not isinstance(split, str):
        raise TypeError(f"split must be a string, got {split!r}")
    s = split.lower()
    aliases = {"training": "train", "validation": "val", "valid": "val", "validate": "val", "testing": "test"}
    s = aliases.get(s, s)
    if s not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    return s


def _first(paths, what: str, root) -> str:
    for p in paths:
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"{what} not found under {root}; looked for: " + ", ".join(map(str, paths)))


def _first_dir(paths) -> str | None:
    for p in paths:
        if os.path.isdir(p):
            return p
    return None


def _media(base_dirs, name: str, *, exts=VIDEO_EXTENSIONS, allow_frames=True, prefer="auto"):
    """Find ``name`` as a video file or a frame folder under ``base_dirs``.

    Returns ``(path, is_frames)`` or ``(None, False)``."""
    if prefer in ("auto", "video"):
        for d in base_dirs:
            for e in exts:
                p = os.path.join(d, name + e)
                if os.path.isfile(p):
                    return p, False
    if allow_frames and prefer in ("auto", "frames"):
        for d in base_dirs:
            p = os.path.join(d, name)
            if os.path.isdir(p):
                return p, True
    return None, False



def _annotation_lines(path: str):
    """(where, line) for every non-empty, stripped line of a text annotation file, where is
    "PATH line K" for the problem reports."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            line = line.strip()
            if line:
                yield f"{path} line {i}", line


class _Counter:
    """A counter shared with forked DataLoader workers (falls back to a local one when pickled)."""

    def __init__(self):
        try:
            self._v = multiprocessing.get_context("fork").Value("l", 0)
        except (ValueError, OSError):  # no fork on this platform
            self._v = None
        self._local = 0

    def add(self, n=1):
        if self._v is not None:
            with self._v.get_lock():
                self._v.value += n
        else:
            self._local += n

    @property
    def value(self) -> int:
        return int(self._v.value) if self._v is not None else self._local

    def __getstate__(self):  # spawn start method: the shared value cannot travel
        return {"_v": None, "_local": self.value}
