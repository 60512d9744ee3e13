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

from .files import OutsideRootError, PathGuard, text_lines

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
    #: the folder the sample must stay inside (links followed), checked again when it is read
    root: str | None = None


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


def _media(base_dirs, name: str, *, exts=VIDEO_EXTENSIONS, allow_frames=True, prefer="auto", guard=None):
    """Find ``name`` as a video file or a frame folder under ``base_dirs``.

    Returns ``(path, is_frames, base)`` (``base``: the folder it was found in) or
    ``(None, False, None)``.  A name that leads out of a base folder (``..``, an absolute
    path, a link) raises :class:`~.files.OutsideRootError` before anything there is looked
    at.  ``guard``: the :class:`~.files.PathGuard` of the annotation file being read."""
    guard = guard or PathGuard()
    for d in base_dirs:
        guard(os.path.join(d, name), d, links=False)
    if prefer in ("auto", "video"):
        for d in base_dirs:
            for e in exts:
                p = os.path.join(d, name + e)
                if os.path.isfile(p):
                    return guard(p, d), False, d
    if allow_frames and prefer in ("auto", "frames"):
        for d in base_dirs:
            p = os.path.join(d, name)
            if os.path.isdir(p):
                return guard(p, d), True, d
    return None, False, None


def _unchecked_media(base: str, name: str, ext: str = "", frames: bool = False, guard=None) -> dict:
    """The record fields of a sample not looked for on disk (``check_files=False``): its
    path under ``base``, refused (:class:`~.files.OutsideRootError`) if it leaves it."""
    guard = guard or PathGuard()
    return dict(path=guard(os.path.join(base, name + ext), base), frames=frames, root=base)


def _locate(where: str, problems: list, name: str, root: str, lookups, *, check_files: bool, missing: str,
            missing_frames: bool = False, guard=None) -> dict | None:
    """The record fields (``path``, ``frames``, ``root``) of the sample ``name``, or None
    after adding its problem (missing, or leaving the root) to ``problems``.

    ``lookups`` is a sequence of ``(base_dirs, media options)`` tried in turn (e.g. videos,
    then frame folders); ``missing`` is the extension of the path reported (and used when
    ``check_files`` is off) when nothing is found; it lies in the first base folder."""
    try:
        for dirs, options in lookups:
            path, frames, base = _media(dirs, name, guard=guard, **options)
            if path is not None:
                return dict(path=path, frames=frames, root=base)
        fallback = next((d[0] for d, _ in lookups if d), root)
        if check_files:
            problems.append(f"{where}: missing {'frame folder' if missing_frames else 'file'} "
                            f"{os.path.join(fallback, name)}{missing}")
            return None
        return _unchecked_media(fallback, name, missing, frames=missing_frames, guard=guard)
    except OutsideRootError as e:
        problems.append(f"{where}: {e}")
        return None


def _annotation_lines(path: str):
    """(where, line) for every non-empty, stripped line of a text annotation file, where is
    "PATH line K" for the problem reports (undecodable bytes: :class:`~.files.AnnotationError`)."""
    return text_lines(path)


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
