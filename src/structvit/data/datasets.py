"""Video datasets in the official layouts of the paper's benchmarks, and ImageNet folders.

Each reader turns the official annotation files into :class:`Annotations`: a list of
:class:`VideoRecord` (file or frame folder, label, frame range), the class names in
label order (from the official files, never from folder order) and the problems found
(unknown labels, missing files, malformed rows), each naming its file and row.

:class:`VideoDataset` samples frames (:mod:`.sampling`), decodes them (:mod:`.video`),
transforms the clip (:mod:`.transforms`) and returns ``(clip, label)`` with ``clip`` a
float tensor ``(C, T, H, W)``, or ``(views, label)`` with ``views`` ``(V, C, T, H, W)``,
``V = num_clips * num_crops`` (clip-major), in multi-view test mode.  A file that fails
to decode is logged with its path and counted (``num_bad_samples``); in training it is
replaced by another random sample (at most ``max_retries`` times in a row before a clear
error), in evaluation it is skipped (``__getitem__`` returns None, :func:`skip_collate`
drops it and counts it), so no sample is scored twice.  Records of splits without labels
(the Kinetics-400 test CSV, SSv2's ``test.json``) have the label :data:`UNLABELLED` (-1):
they serve prediction only.

Layouts (``root`` is the dataset folder; the first existing candidate is used):

* ``kinetics400``: ``{root}/annotations/{split}.csv`` or ``{root}/{split}.csv`` (also
  ``validate.csv``), columns ``label,youtube_id,time_start,time_end,split`` (a test CSV
  without the ``label`` column gives unlabelled records); clips
  ``{youtube_id}_{time_start:06d}_{time_end:06d}.mp4`` anywhere under ``{root}/{split}/``
  (per-label sub-folders allowed).  Classes: the sorted label names of the train CSV.
  Alternatively ``annotation_file=`` a "path label" list (``{root}``-relative paths).
* ``ssv2``: ``labels/{labels,train,validation,test}.json`` (as Qualcomm distributes it)
  or the older ``something-something-v2-{labels,train,validation,test}.json``, in
  ``{root}/labels``, ``{root}/annotations`` or ``{root}``; videos
  ``{root}/20bn-something-something-v2/{id}.webm`` (or ``{root}/videos``).  Label = the
  labels-JSON index of the template with its brackets removed; ``test.json`` has no
  templates: labels from ``test-answers.csv`` (``id;label``) next to it, else unlabelled.
* ``ssv1``: ``something-something-v1-{labels,train,validation}.csv`` (``;``-separated
  ``id;label``; labels file: one class per line, line order = label); frames
  ``{root}/20bn-something-something-v1/{id}/00001.jpg`` ...
* ``diving48``: ``Diving48_V2_{train,test}.json`` (``vid_name, label, start_frame,
  end_frame``; ``val`` means ``test``), optional ``Diving48_vocab.json``; videos
  ``{root}/rgb/{vid_name}.mp4`` or frame folders ``{root}/frames/{vid_name}/``.
* ``gym99`` / ``gym288`` (FineGym): ``gym99_train_element_v1.1.txt``,
  ``gym99_val_element.txt`` (``clip_id label`` lines), optional ``gym99_categories.txt``;
  clips ``{root}/subactions/{clip_id}.mp4`` (or ``clips``/``videos``) or frame folders.
"""
from __future__ import annotations

import csv
import json
import logging
import multiprocessing
import os
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .sampling import FrameSampler
from .video import (
    IMAGE_EXTENSIONS,
    DataFileError,
    list_frame_files,
    probe_video,
    read_frame_folder,
    read_video_frames,
)

log = logging.getLogger("structvit.data")

__all__ = [
    "VideoRecord",
    "Annotations",
    "VideoDataset",
    "read_kinetics400",
    "read_path_label_list",
    "read_ssv2",
    "read_ssv1",
    "read_diving48",
    "read_finegym",
    "READERS",
    "read_annotations",
    "ssv2_template_to_label",
    "ImageFolderDataset",
    "read_loc_val_solution",
    "read_devkit_ground_truth",
    "normalize_split",
    "VIDEO_EXTENSIONS",
    "UNLABELLED",
    "EvalItems",
    "skip_collate",
    "BENCHMARK_CLASSES",
]

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


# --------------------------------------------------------------------------- Kinetics-400
def _kinetics_csv_candidates(root, split):
    names = [f"{split}.csv"] + (["validate.csv", "validation.csv"] if split == "val" else [])
    dirs = [os.path.join(root, "annotations"), root, os.path.join(root, "kinetics400")]
    return [os.path.join(d, n) for d in dirs for n in names]


def _read_kinetics_csv(path) -> tuple[list[dict], bool]:
    """The rows of a Kinetics CSV and whether it has a ``label`` column (the test CSV may not)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or [])
        need = {"youtube_id", "time_start", "time_end"}
        if not need <= cols:
            raise ValueError(f"{path}: expected columns label (optional for test), {', '.join(sorted(need))}; "
                             f"found {', '.join(sorted(cols))}")
        rows = []
        for i, row in enumerate(reader, start=2):
            row["_line"] = i
            rows.append(row)
    return rows, "label" in cols


def read_kinetics400(root, split: str = "train", *, annotation_file=None, video_dir=None, classes_file=None,
                     check_files: bool = True) -> Annotations:
    """Kinetics-400 from its CSV (or a "path label" list file, see module doc)."""
    split = normalize_split(split)
    root = os.fspath(root)
    if annotation_file is not None and not str(annotation_file).endswith(".csv"):
        return read_path_label_list(annotation_file, video_dir or root, classes_file=classes_file,
                                    check_files=check_files)
    ann = os.fspath(annotation_file) if annotation_file else _first(
        _kinetics_csv_candidates(root, split), f"Kinetics-400 {split} CSV", root)
    rows, has_labels = _read_kinetics_csv(ann)
    problems = []
    if not has_labels and split != "test":
        raise ValueError(f"{ann}: no label column; only a test CSV may come without labels")
    if classes_file:
        classes = [ln.strip() for ln in open(classes_file, encoding="utf-8") if ln.strip()]
    else:
        train_csv = next((p for p in _kinetics_csv_candidates(root, "train") if os.path.isfile(p)), None)
        src_rows = rows if train_csv is None or os.path.abspath(train_csv) == os.path.abspath(ann) else \
            _read_kinetics_csv(train_csv)[0]
        classes = sorted({r["label"] for r in src_rows if r.get("label")})
        if not classes:
            raise ValueError(f"{ann}: no class names (no labelled train CSV found next to it; "
                             "pass classes_file=)")
        if train_csv is None:
            problems.append(f"{ann}: no train CSV found; classes taken from this CSV ({len(classes)})")
    index = {c: i for i, c in enumerate(classes)}
    vdir = video_dir or _first_dir([os.path.join(root, split)] + (
        [os.path.join(root, "validate"), os.path.join(root, "validation")] if split == "val" else [])
        + [os.path.join(root, "videos", split), os.path.join(root, "videos")])
    files = {}
    if vdir is not None:
        for dp, _, fnames in os.walk(vdir):
            for fn in fnames:
                stem, ext = os.path.splitext(fn)
                if ext.lower() in VIDEO_EXTENSIONS:
                    files.setdefault(stem, os.path.join(dp, fn))
    elif check_files:
        problems.append(f"{root}: no video folder for split {split!r} (looked for {split}/, videos/)")
    records = []
    for row in rows:
        where = f"{ann} line {row['_line']}"
        label = row.get("label") or ""
        if has_labels and label not in index:
            problems.append(f"{where}: unknown label {label!r}")
            continue
        try:
            name = f"{row['youtube_id']}_{int(float(row['time_start'])):06d}_{int(float(row['time_end'])):06d}"
        except (TypeError, ValueError):
            problems.append(f"{where}: bad time_start/time_end {row.get('time_start')!r}/{row.get('time_end')!r}")
            continue
        path = files.get(name)
        if path is None:
            if check_files:
                problems.append(f"{where}: missing file {os.path.join(vdir or root, name)}.mp4")
                continue
            path = os.path.join(vdir or root, name + ".mp4")
        records.append(VideoRecord(path, index[label] if has_labels else UNLABELLED, name=name))
    return Annotations(records, classes, problems)


def read_path_label_list(list_file, video_root, *, classes_file=None, num_classes=None,
                         check_files: bool = True) -> Annotations:
    """The common "path label" list format: one ``relative/path.mp4 label`` per line
    (paths relative to ``video_root``; a frame folder may stand for a video)."""
    problems, records = [], []
    list_file = os.fspath(list_file)
    classes = [ln.strip() for ln in open(classes_file, encoding="utf-8") if ln.strip()] if classes_file else None
    k = len(classes) if classes else num_classes
    rows = []
    with open(list_file, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
                problems.append(f"{list_file} line {i}: expected 'path label', got {line!r}")
                continue
            rows.append((i, parts[0], int(parts[1])))
    if k is None:
        k = max((r[2] for r in rows), default=-1) + 1
    for i, rel, label in rows:
        where = f"{list_file} line {i}"
        if not 0 <= label < k:
            problems.append(f"{where}: unknown label {label} (expected 0..{k - 1})")
            continue
        path = rel if os.path.isabs(rel) else os.path.join(video_root, rel)
        is_frames = os.path.isdir(path)
        if check_files and not (is_frames or os.path.isfile(path)):
            problems.append(f"{where}: missing file {path}")
            continue
        records.append(VideoRecord(path, label, frames=is_frames, name=rel))
    return Annotations(records, classes or [str(i) for i in range(k)], problems)


# --------------------------------------------------------------------------- Something-Something
def ssv2_template_to_label(template: str) -> str:
    """``"Putting [something] on [something]"`` -> ``"Putting something on something"``."""
    return template.replace("[", "").replace("]", "")


def _annotation_lines(path: str):
    """(where, line) for every non-empty, stripped line of a text annotation file, where is
    "PATH line K" for the problem reports."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            line = line.strip()
            if line:
                yield f"{path} line {i}", line


def _ssv_annotation_files(root: str, split: str, version: str, ext: str) -> tuple[str, str]:
    """The labels file and the split's annotation file of Something-Something ``version``
    (v1/v2), looked for in ``root/labels``, ``root/annotations`` and ``root``: the long
    names (``something-something-v2-train.json``) or, for v2, the short ones of the current
    distribution (``labels/train.json``).  Both files come from the same folder."""
    name = {"train": "train", "val": "validation", "test": "test"}[normalize_split(split)]
    adirs = [os.path.join(root, "labels"), os.path.join(root, "annotations"), root]
    pairs = [(f"something-something-{version}-labels.{ext}", f"something-something-{version}-{name}.{ext}")]
    if version == "v2":
        pairs.append((f"labels.{ext}", f"{name}.{ext}"))
    looked = []
    for d in adirs:
        for labels, ann in pairs:
            lp, ap = os.path.join(d, labels), os.path.join(d, ann)
            if os.path.isfile(lp) and os.path.isfile(ap):
                return lp, ap
            looked.append(ap)
    raise FileNotFoundError(f"Something-Something {version} {split} annotations not found under {root}; "
                            f"looked for (each next to its labels file): " + ", ".join(looked))


def read_ssv2(root, split: str = "train", *, check_files: bool = True) -> Annotations:
    root = os.fspath(root)
    labels_path, ann = _ssv_annotation_files(root, split, "v2", "json")
    with open(labels_path, encoding="utf-8") as f:
        label_map = {k: int(v) for k, v in json.load(f).items()}
    classes = [None] * len(label_map)
    problems = []
    for k, v in label_map.items():
        if not 0 <= v < len(classes) or classes[v] is not None:
            raise ValueError(f"{labels_path}: label indices must be a permutation of 0..{len(classes) - 1}")
        classes[v] = k
    vdirs = [p for p in (os.path.join(root, "20bn-something-something-v2"), os.path.join(root, "videos"), root)
             if os.path.isdir(p)]
    with open(ann, encoding="utf-8") as f:
        entries = json.load(f)
    answers = _ssv2_test_answers(ann, label_map, problems) if normalize_split(split) == "test" else None
    records = []
    for i, e in enumerate(entries):
        where = f"{ann} entry {i} (id {e.get('id')!r})"
        if "id" not in e:
            problems.append(f"{where}: no id")
            continue
        if "template" in e:
            lab = ssv2_template_to_label(e["template"])
        elif answers is not None:  # the test split: labels (if any) in test-answers.csv
            lab = answers.get(str(e["id"]))
            if answers and lab is None:
                problems.append(f"{where}: not in test-answers.csv")
                continue
        else:
            problems.append(f"{where}: no template")
            continue
        if lab is not None and lab not in label_map:
            problems.append(f"{where}: unknown label {lab!r}")
            continue
        vid = str(e["id"])
        path, frames = _media(vdirs, vid, exts=(".webm", ".mp4"))
        if path is None:
            if check_files:
                problems.append(f"{where}: missing file {os.path.join(vdirs[0] if vdirs else root, vid)}.webm")
                continue
            path = os.path.join(vdirs[0] if vdirs else root, vid + ".webm")
        records.append(VideoRecord(path, UNLABELLED if lab is None else label_map[lab], frames=frames, name=vid))
    return Annotations(records, classes, problems)


def _ssv2_test_answers(ann: str, label_map: dict, problems: list) -> dict:
    """``{id: class name}`` from ``test-answers.csv`` (``id;label`` lines) in the folder of the
    test JSON or its parent; empty if there is none (the test split is then unlabelled)."""
    d = os.path.dirname(os.path.abspath(ann))
    path = next((p for p in (os.path.join(d, "test-answers.csv"), os.path.join(os.path.dirname(d), "test-answers.csv"))
                 if os.path.isfile(p)), None)
    out = {}
    if path is None:
        return out
    for where, line in _annotation_lines(path):
        vid, sep, lab = line.partition(";")
        if not sep:
            problems.append(f"{where}: expected 'id;label', got {line!r}")
            continue
        out[vid.strip()] = lab.strip()
    return out


def read_ssv1(root, split: str = "train", *, check_files: bool = True) -> Annotations:
    root = os.fspath(root)
    labels_path, ann = _ssv_annotation_files(root, split, "v1", "csv")
    with open(labels_path, encoding="utf-8") as f:
        classes = [ln.strip() for ln in f if ln.strip()]
    index = {c: i for i, c in enumerate(classes)}
    if len(index) != len(classes):
        raise ValueError(f"{labels_path}: duplicate class names")
    fdirs = [p for p in (os.path.join(root, "20bn-something-something-v1"), os.path.join(root, "frames"), root)
             if os.path.isdir(p)]
    problems, records = [], []
    for where, line in _annotation_lines(ann):
        parts = line.split(";", 1)
        if len(parts) != 2:
            problems.append(f"{where}: expected 'id;label', got {line!r}")
            continue
        vid, lab = parts[0].strip(), parts[1].strip()
        if lab not in index:
            problems.append(f"{where}: unknown label {lab!r}")
            continue
        path, frames = _media(fdirs, vid, prefer="frames")
        if path is None:
            if check_files:
                problems.append(f"{where}: missing frame folder {os.path.join(fdirs[0] if fdirs else root, vid)}")
                continue
            path, frames = os.path.join(fdirs[0] if fdirs else root, vid), True
        records.append(VideoRecord(path, index[lab], frames=frames, name=vid))
    return Annotations(records, classes, problems)


# --------------------------------------------------------------------------- Diving-48
def read_diving48(root, split: str = "train", *, media: str = "auto", check_files: bool = True) -> Annotations:
    split = normalize_split(split)
    if media not in ("auto", "video", "frames"):
        raise ValueError(f"media must be 'auto', 'video' or 'frames', got {media!r}")
    root = os.fspath(root)
    adirs = [os.path.join(root, "annotations"), root]
    name = "train" if split == "train" else "test"
    ann = _first([os.path.join(d, f"Diving48_V2_{name}.json") for d in adirs], f"Diving48_V2_{name}.json", root)
    vocab_path = next((p for p in (os.path.join(d, "Diving48_vocab.json") for d in adirs) if os.path.isfile(p)), None)
    if vocab_path:
        with open(vocab_path, encoding="utf-8") as f:
            vocab = json.load(f)
        classes = [" ".join(v) if isinstance(v, list) else str(v) for v in vocab]
    else:
        classes = [str(i) for i in range(48)]
    vdirs = [p for p in (os.path.join(root, "rgb"), os.path.join(root, "videos"), root) if os.path.isdir(p)]
    fdirs = [p for p in (os.path.join(root, "frames"), os.path.join(root, "rawframes"),
                         os.path.join(root, "rgb_frames")) if os.path.isdir(p)]
    with open(ann, encoding="utf-8") as f:
        entries = json.load(f)
    problems, records = [], []
    for i, e in enumerate(entries):
        where = f"{ann} entry {i} (vid_name {e.get('vid_name')!r})"
        try:
            vid, label = str(e["vid_name"]), int(e["label"])
            start = int(e.get("start_frame", 0) or 0)
            end = e.get("end_frame")
            end = None if end is None else int(end)
        except (KeyError, TypeError, ValueError) as err:
            problems.append(f"{where}: malformed entry ({err})")
            continue
        if not 0 <= label < len(classes):
            problems.append(f"{where}: unknown label {label} (expected 0..{len(classes) - 1})")
            continue
        if end is not None and end <= start:
            problems.append(f"{where}: end_frame {end} <= start_frame {start}")
            continue
        path, frames = (None, False)
        if media != "frames":
            path, frames = _media(vdirs, vid, allow_frames=False)
        if path is None and media != "video":
            path, frames = _media(fdirs, vid, prefer="frames")
        if path is None:
            if check_files:
                problems.append(f"{where}: missing file {os.path.join(vdirs[0] if vdirs else root, vid)}.mp4")
                continue
            path = os.path.join(vdirs[0] if vdirs else root, vid + ".mp4")
        records.append(VideoRecord(path, label, start, end, frames=frames, name=vid))
    return Annotations(records, classes, problems)


# --------------------------------------------------------------------------- FineGym
_GYM_CLASSES = {"gym99": 99, "gym288": 288}


def read_finegym(root, split: str = "train", *, variant: str = "gym99", check_files: bool = True) -> Annotations:
    split = normalize_split(split)
    if variant not in _GYM_CLASSES:
        raise ValueError(f"variant must be one of {sorted(_GYM_CLASSES)}, got {variant!r}")
    root = os.fspath(root)
    adirs = [os.path.join(root, "annotations"), root]
    names = ([f"{variant}_train_element_v1.1.txt", f"{variant}_train_element_v1.0.txt", f"{variant}_train_element.txt"]
             if split == "train" else [f"{variant}_val_element.txt", f"{variant}_val_element_v1.1.txt"])
    ann = _first([os.path.join(d, n) for d in adirs for n in names], f"FineGym {variant} {split} list", root)
    k = _GYM_CLASSES[variant]
    classes = [str(i) for i in range(k)]
    cat = next((p for p in (os.path.join(d, f"{variant}_categories.txt") for d in adirs) if os.path.isfile(p)), None)
    if cat:
        names_by_label = {}
        with open(cat, encoding="utf-8") as f:
            for line in f:
                m = re.match(r"\s*Clabel:\s*(\d+);.*?;\s*Glabel:\s*\d+;\s*(.*)$", line)
                if m:
                    names_by_label[int(m.group(1))] = m.group(2).strip()
        classes = [names_by_label.get(i, str(i)) for i in range(k)]
    vdirs = [p for p in (os.path.join(root, "subactions"), os.path.join(root, "clips"), os.path.join(root, "videos"),
                         root) if os.path.isdir(p)]
    fdirs = [p for p in (os.path.join(root, "frames"), os.path.join(root, "subaction_frames"), os.path.join(root, "rawframes"))
             if os.path.isdir(p)]
    problems, records = [], []
    for where, line in _annotation_lines(ann):
        parts = line.split()
        if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
            problems.append(f"{where}: expected 'clip_id label', got {line!r}")
            continue
        clip, label = parts[0], int(parts[1])
        if not 0 <= label < k:
            problems.append(f"{where}: unknown label {label} (expected 0..{k - 1})")
            continue
        path, frames = _media(vdirs, clip, prefer="video")
        if path is None:
            path, frames = _media(fdirs, clip, prefer="frames")
        if path is None:
            if check_files:
                problems.append(f"{where}: missing file {os.path.join(vdirs[0] if vdirs else root, clip)}.mp4")
                continue
            path = os.path.join(vdirs[0] if vdirs else root, clip + ".mp4")
        records.append(VideoRecord(path, label, frames=frames, name=clip))
    return Annotations(records, classes, problems)


READERS: dict[str, Callable[..., Annotations]] = {
    "kinetics400": read_kinetics400,
    "ssv2": read_ssv2,
    "ssv1": read_ssv1,
    "diving48": read_diving48,
    "gym99": lambda root, split="train", **kw: read_finegym(root, split, variant="gym99", **kw),
    "gym288": lambda root, split="train", **kw: read_finegym(root, split, variant="gym288", **kw),
}
_ALIASES = {"k400": "kinetics400", "kinetics": "kinetics400", "kinetics-400": "kinetics400", "sthv2": "ssv2", "something-something-v2": "ssv2",
            "sthv1": "ssv1", "something-something-v1": "ssv1", "diving-48": "diving48",
            "finegym99": "gym99", "finegym288": "gym288", "finegym": "gym99"}


def canonical_name(dataset: str) -> str:
    """Lower-case name with aliases resolved (``"K400"`` -> ``"kinetics400"``)."""
    if not isinstance(dataset, str):
        raise TypeError(f"dataset must be a string, got {dataset!r}")
    key = dataset.strip().lower().replace("_", "-")
    return _ALIASES.get(key, key.replace("-", "_"))


def read_annotations(dataset: str, root, split: str = "train", **kwargs) -> Annotations:
    """Dispatch to the reader of ``dataset`` (``kinetics400``, ``ssv2``, ``ssv1``,
    ``diving48``, ``gym99``, ``gym288``)."""
    name = canonical_name(dataset)
    if name not in READERS:
        raise ValueError(f"dataset must be one of {sorted(READERS)}, got {dataset!r}")
    if root is None or not os.path.isdir(root):
        raise FileNotFoundError(f"root of dataset {dataset!r} is not a folder: {root!r}")
    return READERS[name](root, split, **kwargs)


# --------------------------------------------------------------------------- the dataset
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


def _read_record_frames(rec: VideoRecord, sampler: FrameSampler, train: bool, rng) -> tuple[torch.Tensor, np.ndarray]:
    """Sample and decode; returns frames (K*T, H, W, 3) and the (K, T) indices (in file frames)."""
    if rec.frames:
        files = list_frame_files(rec.path)
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
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
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
            frames, idx = _read_record_frames(rec, self.sampler, self.train, rng)
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


# --------------------------------------------------------------------------- images
_IMAGE_FILE_EXTENSIONS = IMAGE_EXTENSIONS + (".bmp", ".webp")
#: where ImageNet's split folders are, relative to the dataset root: the plain layout and
#: Kaggle's (``ILSVRC/Data/CLS-LOC/{train,val,test}``)
_IMAGENET_SPLIT_BASES = ("", os.path.join("ILSVRC", "Data", "CLS-LOC"))
_DEVKIT_DIRS = ("", "ILSVRC2012_devkit_t12", os.path.join("ILSVRC2012_devkit_t12", "data"), "data", "devkit")


def _is_image(name: str) -> bool:
    return name.lower().endswith(_IMAGE_FILE_EXTENSIONS)


def read_loc_val_solution(path) -> dict[str, str]:
    """``{image id: wnid}`` from ImageNet's ``LOC_val_solution.csv`` (columns ``ImageId,
    PredictionString``; the string is ``wnid x_min y_min x_max y_max`` repeated per box, all
    boxes of one image have its class)."""
    out = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"ImageId", "PredictionString"} <= set(reader.fieldnames or []):
            raise ValueError(f"{path}: expected columns ImageId,PredictionString, found {reader.fieldnames}")
        for i, row in enumerate(reader, start=2):
            tokens = (row["PredictionString"] or "").split()
            if not tokens:
                raise ValueError(f"{path} line {i}: empty PredictionString for {row['ImageId']!r}")
            out[row["ImageId"].strip()] = tokens[0]
    return out


def read_devkit_ground_truth(gt_path, meta_path) -> list[str]:
    """The wnid of every validation image, in file-name order, from the ILSVRC2012 devkit:
    ``ILSVRC2012_validation_ground_truth.txt`` (one 1-based ILSVRC2012_ID per line) and
    ``meta.mat`` (MATLAB; read with scipy) mapping ILSVRC2012_IDs to wnids."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ImportError(f"reading {meta_path} (MATLAB) needs scipy: pip install scipy; or give the validation "
                          "labels as LOC_val_solution.csv") from None
    synsets = loadmat(os.fspath(meta_path), squeeze_me=True)["synsets"]
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
    out = []
    for where, line in _annotation_lines(os.fspath(gt_path)):
        try:
            out.append(id_to_wnid[int(line)])
        except (ValueError, KeyError):
            raise ValueError(f"{where}: {line!r} is not an ILSVRC2012_ID of {meta_path}") from None
    return out


class ImageFolderDataset(torch.utils.data.Dataset):
    """ImageNet as distributed, and ImageNet-style class folders.

    The split folder is ``{root}/{split}`` or, in Kaggle's layout,
    ``{root}/ILSVRC/Data/CLS-LOC/{split}``.  A split of class folders
    (``{split}/{class}/*.JPEG``) takes its labels from the folder names.  A flat split (the
    validation images as distributed, ``val/ILSVRC2012_val_00000001.JPEG``) takes them from
    ``LOC_val_solution.csv`` (in ``root``) or the devkit's
    ``ILSVRC2012_validation_ground_truth.txt`` with its ``meta.mat`` (in ``root``,
    ``root/ILSVRC2012_devkit_t12/data``); a flat ``test`` split without such a file is
    unlabelled (label :data:`UNLABELLED`, prediction only).

    Classes: the lines of a class list file in ``root`` if there is one
    (``LOC_synset_mapping.txt`` or ``classes.txt``: first token of each line is the
    folder name, the rest its description, kept in ``class_descriptions``), else the
    sorted train-folder names (ImageNet's wnid order) - never the file system's listing
    order.  Folders and labels not in the class list are reported.  Unreadable images are
    replaced by the next one in training (``on_unreadable="replace"``) and skipped
    (``"skip"``: ``__getitem__`` returns None) otherwise.
    """

    def __init__(self, root, split: str = "train", *, transform=None, classes=None, on_unreadable: str = "replace"):
        from torchvision.datasets.folder import default_loader

        if on_unreadable not in ("replace", "skip"):
            raise ValueError(f"on_unreadable must be 'replace' or 'skip', got {on_unreadable!r}")
        root = os.fspath(root)
        split_dir = self.split_dir(root, split)
        self.root, self.split = root, split
        self.classes = list(classes) if classes is not None else self.find_classes(root)
        self.class_descriptions = self.find_descriptions(root)
        index = {c: i for i, c in enumerate(self.classes)}
        self.problems = []
        self.samples = []
        subdirs = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
        flat = sorted(n for n in os.listdir(split_dir) if _is_image(n) and os.path.isfile(os.path.join(split_dir, n)))
        if subdirs and not flat:
            for d in subdirs:
                p = os.path.join(split_dir, d)
                if d not in index:
                    self.problems.append(f"{p}: folder {d!r} is not a known class")
                    continue
                for dp, _, fnames in sorted(os.walk(p)):
                    for fn in sorted(fnames):
                        if _is_image(fn):
                            self.samples.append((os.path.join(dp, fn), index[d]))
        elif flat:
            self._read_flat(root, split, split_dir, flat, index)
        if self.problems:
            log.warning("%d image folder problem(s):\n  %s", len(self.problems), "\n  ".join(self.problems[:50]))
        if not self.samples:
            raise ValueError(f"no images found in {split_dir}")
        self.targets = [s[1] for s in self.samples]
        self.transform = transform
        self.loader = default_loader
        self.on_unreadable = on_unreadable
        self._bad = _Counter()
        self.bad_files: list[str] = []
        self.max_retries = 10

    def _read_flat(self, root, split, split_dir, names, index) -> None:
        """Labels of a flat split from the official files (see the class docstring)."""
        solution = next((p for p in (os.path.join(root, "LOC_val_solution.csv"),
                                     os.path.join(split_dir, "LOC_val_solution.csv")) if os.path.isfile(p)), None)
        gt = next((os.path.join(root, d, "ILSVRC2012_validation_ground_truth.txt") for d in _DEVKIT_DIRS
                   if os.path.isfile(os.path.join(root, d, "ILSVRC2012_validation_ground_truth.txt"))), None)
        if split != "test" and solution is not None:
            wnid_of = read_loc_val_solution(solution)
            source = solution
            labels = []
            for n in names:
                stem = os.path.splitext(n)[0]
                if stem not in wnid_of:
                    self.problems.append(f"{os.path.join(split_dir, n)}: not in {solution}")
                labels.append(wnid_of.get(stem))
        elif split != "test" and gt is not None:
            meta = os.path.join(os.path.dirname(gt), "meta.mat")
            if not os.path.isfile(meta):
                raise FileNotFoundError(f"{gt} needs the devkit's meta.mat next to it (ILSVRC2012_ID -> wnid)")
            wnids = read_devkit_ground_truth(gt, meta)
            source = gt
            if len(wnids) != len(names):
                raise ValueError(f"{gt} has {len(wnids)} labels but {split_dir} holds {len(names)} images")
            labels = wnids  # line k is the k-th image in name order (ILSVRC2012_val_%08d)
        elif split == "test":
            for n in names:
                self.samples.append((os.path.join(split_dir, n), UNLABELLED))
            return
        else:
            raise FileNotFoundError(
                f"{split_dir} holds images but no class folders, and no label file was found: expected "
                f"{os.path.join(root, 'LOC_val_solution.csv')} or the devkit's "
                f"ILSVRC2012_validation_ground_truth.txt + meta.mat under {root}")
        for n, wnid in zip(names, labels):
            if wnid is None:
                continue
            if wnid not in index:
                self.problems.append(f"{os.path.join(split_dir, n)}: label {wnid!r} ({source}) is not a known class")
                continue
            self.samples.append((os.path.join(split_dir, n), index[wnid]))

    @staticmethod
    def split_dir(root, split: str) -> str:
        root = os.fspath(root)
        cands = [os.path.join(root, base, split) for base in _IMAGENET_SPLIT_BASES]
        found = _first_dir(cands)
        if found is None:
            raise FileNotFoundError(f"image folder split {split!r} not found; looked for " + ", ".join(cands))
        return found

    @staticmethod
    def _class_list_file(root) -> str | None:
        return next((os.path.join(root, n) for n in ("LOC_synset_mapping.txt", "classes.txt", "synsets.txt")
                     if os.path.isfile(os.path.join(root, n))), None)

    @staticmethod
    def find_classes(root) -> list[str]:
        root = os.fspath(root)
        p = ImageFolderDataset._class_list_file(root)
        if p is not None:
            with open(p, encoding="utf-8") as f:
                return [ln.split()[0] for ln in f if ln.strip()]
        train = _first_dir([os.path.join(root, base, "train") for base in _IMAGENET_SPLIT_BASES])
        if train is None:
            raise FileNotFoundError(f"no class list file (LOC_synset_mapping.txt, classes.txt) and no train "
                                    f"folder in {root}")
        return sorted(d for d in os.listdir(train) if os.path.isdir(os.path.join(train, d)))

    @staticmethod
    def find_descriptions(root) -> dict[str, str]:
        """``{class: description}`` from the class list file (``n01440764 tench, Tinca tinca``)."""
        p = ImageFolderDataset._class_list_file(os.fspath(root))
        out = {}
        if p is not None:
            with open(p, encoding="utf-8") as f:
                for ln in f:
                    parts = ln.strip().split(maxsplit=1)
                    if len(parts) == 2:
                        out[parts[0]] = parts[1]
        return out

    @property
    def num_classes(self):
        return len(self.classes)

    @property
    def num_bad_samples(self):
        return self._bad.value

    @property
    def sample_ids(self) -> list[str]:
        """The image paths relative to the split folder, without extension (``ILSVRC2012_val_00000001``)."""
        base = self.split_dir(self.root, self.split)
        return [os.path.splitext(os.path.relpath(p, base))[0] for p, _ in self.samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        i, tried = index, []
        for _attempt in range(self.max_retries + 1):
            path, target = self.samples[i]
            try:
                img = self.loader(path)
            except Exception as e:
                self._bad.add()
                self.bad_files.append(path)
                if self.on_unreadable == "skip":
                    log.warning("unreadable image %s (%s) skipped", path, e)
                    return None
                tried.append(f"{path}: {e}")
                j = (i + 1) % len(self)
                log.warning("unreadable image %s (%s); replaced by sample %d", path, e, j)
                i = j
                continue
            return (self.transform(img) if self.transform is not None else img), target
        raise RuntimeError(f"sample {index}: {len(tried)} unreadable images in a row:\n  " + "\n  ".join(tried))
