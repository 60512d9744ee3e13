"""Scanning a dataset for every problem without training (the library side of
``structvit data check``).

:data:`DATASET_CHECKS` maps each dataset name to its check: a callable
``check(root, splits=..., *, quick, progress, num_classes, reader_options, progress_every)
-> list[str]`` (it may take only some of the keyword options; :func:`check_dataset` passes
those it names), the
string ``"package.module:function"`` of one (imported when used, so a reader module can
register itself without an import cycle), or None for built-in data (generated, nothing on
disk).  A new format plugs in with one entry.
"""
from __future__ import annotations

import importlib
import inspect
import time
from typing import Callable

from .base import BENCHMARK_CLASSES

__all__ = ["check_dataset", "check_video_benchmark", "check_image_folder", "DATASET_CHECKS", "dataset_check"]


class _Progress:
    """Calls ``progress(message)`` at most every ``every`` seconds."""

    def __init__(self, progress, every: float):
        self.progress, self.every, self.last = progress, every, time.perf_counter()

    def __call__(self, split, i, n):
        if self.progress and time.perf_counter() - self.last >= self.every:
            self.last = time.perf_counter()
            self.progress(f"{split}: {i}/{n} samples decoded ({100 * i / max(n, 1):.0f}%)")


def _class_problems(name, root, classes, labels_by_split, expected) -> list[str]:
    """The class count against the benchmark's, and labels present in only one split."""
    problems = []
    if classes is not None and expected is not None and len(classes) != expected:
        problems.append(f"{root}: {len(classes)} classes, the {name} benchmark has {expected} (a misspelled or "
                        f"extra label in the train annotations? --num-classes {len(classes)} if intended)")
    if classes is not None and len(labels_by_split) > 1:
        every = set.union(*labels_by_split.values())
        for label in sorted(every):
            present = [s for s, labs in labels_by_split.items() if label in labs]
            if len(present) == 1:
                problems.append(f"{root}: label {classes[label]!r} appears only in the {present[0]} split")
    return problems


def _check_record(rec, quick: bool) -> list[str]:
    """The problems of one video record: decodes every frame (``quick``: first, middle, last)."""
    from .files import inside_root
    from .video import count_decodable_frames, list_frame_files, probe_video, read_frame_folder, read_video_frames

    problems = []
    if rec.root is not None:
        inside_root(rec.path, rec.root)
    if rec.frames:
        files = list_frame_files(rec.path, root=rec.root)
        n = len(files)
        read_frame_folder(rec.path, sorted({0, n // 2, n - 1}) if quick else range(n), files=files)
    else:
        n = probe_video(rec.path).num_frames
        if quick:
            read_video_frames(rec.path, sorted({0, n // 2, max(n - 1, 0)}))
        else:
            decoded = count_decodable_frames(rec.path)
            if decoded + 2 < n:  # header counts may overstate by a frame or two
                problems.append(f"{rec.path}: {decoded} frames decoded, the header says {n} "
                                "(truncated or damaged)")
    if rec.end_frame is not None and rec.end_frame > n + 1:
        problems.append(f"{rec.path}: annotation says end_frame {rec.end_frame} but it has {n} frames")
    return problems


def check_video_benchmark(name: str, root, splits=("train", "val"), *, quick: bool = False, progress=None,
                          num_classes: int | None = None, reader_options: dict | None = None,
                          progress_every: float = 5.0) -> list[str]:
    """Every problem of the video benchmark ``name`` (a key of :data:`~.readers.READERS`)."""
    from .readers import read_annotations
    from .video import DataFileError

    expected = num_classes if num_classes is not None else BENCHMARK_CLASSES.get(name)
    tick = _Progress(progress, progress_every)
    problems: list[str] = []
    labels_by_split: dict[str, set] = {}
    classes = None
    for split in splits:
        try:
            ann = read_annotations(name, root, split, **(reader_options or {}))
        except (OSError, ValueError) as e:  # the annotation files: missing, unreadable, malformed
            problems.append(f"{split}: {e}")
            continue
        classes = ann.classes
        problems += ann.problems
        if ann.labelled:
            labels_by_split[split] = {r.label for r in ann.records}
        for i, rec in enumerate(ann.records):
            tick(split, i, len(ann.records))
            try:
                problems += _check_record(rec, quick)
            except DataFileError as e:
                problems.append(str(e))
            except Exception as e:  # anything else: named, and the scan goes on
                problems.append(f"{rec.path}: cannot be read ({type(e).__name__}: {e})")
    return problems + _class_problems(name, root, classes, labels_by_split, expected)


def check_image_folder(name: str, root, splits=("train", "val"), *, quick: bool = False, progress=None,
                       num_classes: int | None = None, reader_options: dict | None = None,
                       progress_every: float = 5.0) -> list[str]:
    """Every problem of ImageNet (``name="imagenet"``: 1000 classes expected) or of any
    folder of classes (``"imagefolder"``); ``quick`` decodes every 50th image."""
    from .files import DataFileError, inside_root
    from .images import load_image
    from .imagenet import ImageFolderDataset

    expected = num_classes if num_classes is not None else BENCHMARK_CLASSES.get(name)
    tick = _Progress(progress, progress_every)
    problems: list[str] = []
    labels_by_split: dict[str, set] = {}
    classes = None
    for split in splits:
        try:
            ds = ImageFolderDataset(root, split)
        except (OSError, ValueError, ImportError) as e:
            problems.append(f"{split}: {e}")
            continue
        classes = ds.classes
        problems += ds.problems
        labels_by_split[split] = {t for t in ds.targets if t >= 0}
        for i, (path, _) in enumerate(ds.samples):
            tick(split, i, len(ds.samples))
            if quick and i % 50:
                continue
            try:
                load_image(inside_root(path, ds._base))
            except DataFileError as e:
                problems.append(str(e))
            except Exception as e:  # anything else: named, and the scan goes on
                problems.append(f"{path}: unreadable image ({type(e).__name__}: {e})")
    return problems + _class_problems(name, root, classes, labels_by_split, expected)


def _video_check(name: str) -> Callable[..., list[str]]:
    def check(root, splits=("train", "val"), **kwargs):
        return check_video_benchmark(name, root, splits, **kwargs)
    return check


def _image_check(name: str) -> Callable[..., list[str]]:
    def check(root, splits=("train", "val"), **kwargs):
        return check_image_folder(name, root, splits, **kwargs)
    return check


#: dataset name -> its check (a callable, "module:function", or None for built-in data)
DATASET_CHECKS: dict[str, Callable[..., list[str]] | str | None] = {
    "digits": None,
    "moving_digits": None,
    "kinetics400": _video_check("kinetics400"),
    "ssv2": _video_check("ssv2"),
    "ssv1": _video_check("ssv1"),
    "diving48": _video_check("diving48"),
    "gym99": _video_check("gym99"),
    "gym288": _video_check("gym288"),
    "imagenet": _image_check("imagenet"),
    "imagefolder": _image_check("imagefolder"),
    "coco": "structvit.data.coco:check_coco",
    "ade20k": "structvit.data.ade20k:check_ade20k",
}


def dataset_check(name: str) -> Callable[..., list[str]] | None:
    """The check of dataset ``name`` (a key of :data:`DATASET_CHECKS`; None: built in)."""
    if name not in DATASET_CHECKS:
        raise ValueError(f"dataset must be one of {', '.join(DATASET_CHECKS)}, got {name!r}")
    entry = DATASET_CHECKS[name]
    if isinstance(entry, str):
        module, _, function = entry.partition(":")
        try:
            entry = getattr(importlib.import_module(module), function)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"the check of dataset {name!r} ({DATASET_CHECKS[name]}) cannot be loaded: {e}") from None
    return entry


def check_dataset(dataset: str, root, splits=None, *, quick: bool = False,
                  reader_options: dict | None = None, progress=None, num_classes: int | None = None,
                  progress_every: float = 5.0) -> list[str]:
    """Every problem of ``dataset`` under ``root``, as lines naming the file (empty: all good).

    Reads the official annotation files (unknown labels, malformed rows, missing files),
    compares the label sets of the splits and the class count with the benchmark's
    (``num_classes`` overrides it), then decodes every frame of every video or frame folder
    (``quick``: the first, middle and last frame).  ``progress(message)`` is called about
    every ``progress_every`` seconds.  ``splits`` None: the dataset's own default splits
    (``train`` and ``val`` for the classification benchmarks).  A registered check gets the
    options its signature names (all of them if it takes ``**kwargs``)."""
    from .readers import canonical_name

    check = dataset_check(canonical_name(dataset))
    if check is None:
        return []  # built in: generated, nothing on disk
    options = dict(quick=quick, progress=progress, num_classes=num_classes, reader_options=reader_options,
                   progress_every=progress_every)
    params = inspect.signature(check).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        options = {k: v for k, v in options.items() if k in params}
    args = (root,) if splits is None else (root, tuple(splits))
    return check(*args, **options)
