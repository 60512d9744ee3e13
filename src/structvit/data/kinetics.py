"""Kinetics-400 in its official layout.

``{root}/annotations/{split}.csv`` or ``{root}/{split}.csv`` (also ``validate.csv``),
columns ``label,youtube_id,time_start,time_end,split`` (a test CSV without the ``label``
column gives unlabelled records); clips ``{youtube_id}_{time_start:06d}_{time_end:06d}.mp4``
anywhere under ``{root}/{split}/`` (per-label sub-folders allowed).  Classes: the sorted
label names of the train CSV.  Alternatively ``annotation_file=`` a "path label" list
(``{root}``-relative paths, :func:`~.path_list.read_path_label_list`).
"""
from __future__ import annotations

import os

from .base import (
    UNLABELLED,
    VIDEO_EXTENSIONS,
    Annotations,
    VideoRecord,
    _first,
    _first_dir,
    _unchecked_media,
    normalize_split,
)
from .files import AnnotationError, OutsideRootError, PathGuard, read_csv_rows, text_lines
from .path_list import read_path_label_list

__all__ = ["read_kinetics400"]


def _kinetics_csv_candidates(root, split):
    names = [f"{split}.csv"] + (["validate.csv", "validation.csv"] if split == "val" else [])
    dirs = [os.path.join(root, "annotations"), root, os.path.join(root, "kinetics400")]
    return [os.path.join(d, n) for d in dirs for n in names]


def _read_kinetics_csv(path) -> tuple[list[dict], bool]:
    """The rows of a Kinetics CSV and whether it has a ``label`` column (the test CSV may not)."""
    header, lines = read_csv_rows(path)
    cols = set(header)
    need = {"youtube_id", "time_start", "time_end"}
    if not need <= cols:
        raise AnnotationError(path, f"expected columns label (optional for test), {', '.join(sorted(need))}; "
                              f"found {', '.join(sorted(cols))}", line=1)
    rows = []
    for line, row in lines:
        row["_line"] = line
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
        classes = [line for _, line in text_lines(classes_file)]
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
    records, guard = [], PathGuard()
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
        if path is None and check_files:
            problems.append(f"{where}: missing file {os.path.join(vdir or root, name)}.mp4")
            continue
        try:
            found = dict(path=guard(path, vdir), frames=False, root=vdir) if path is not None else \
                _unchecked_media(vdir or root, name, ".mp4", guard=guard)
        except OutsideRootError as e:
            problems.append(f"{where}: {e}")
            continue
        records.append(VideoRecord(label=index[label] if has_labels else UNLABELLED, name=name, **found))
    return Annotations(records, classes, problems)

