"""The common "path label" list format of video lists (one ``relative/path.mp4 label`` per line)."""
from __future__ import annotations

import os
import re

from .base import Annotations, VideoRecord

__all__ = ["read_path_label_list"]


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

