"""The common "path label" list format of video lists (one ``relative/path.mp4 label`` per line)."""
from __future__ import annotations

import os
import re

from .base import Annotations, VideoRecord
from .files import OutsideRootError, PathGuard, text_lines

__all__ = ["read_path_label_list"]


def read_path_label_list(list_file, video_root, *, classes_file=None, num_classes=None,
                         check_files: bool = True) -> Annotations:
    """The common "path label" list format: one ``relative/path.mp4 label`` per line
    (paths relative to ``video_root``; a frame folder may stand for a video).  A path that
    leads out of ``video_root`` (``..``, absolute, a link) is reported, not read."""
    problems, records, guard = [], [], PathGuard()
    list_file = os.fspath(list_file)
    classes = [line for _, line in text_lines(classes_file)] if classes_file else None
    k = len(classes) if classes else num_classes
    video_root = os.fspath(video_root)
    rows = []
    for where, line in text_lines(list_file):
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
            problems.append(f"{where}: expected 'path label', got {line!r}")
            continue
        rows.append((where, parts[0], int(parts[1])))
    if k is None:
        k = max((r[2] for r in rows), default=-1) + 1
    for where, rel, label in rows:
        if not 0 <= label < k:
            problems.append(f"{where}: unknown label {label} (expected 0..{k - 1})")
            continue
        try:
            path = guard(os.path.join(video_root, rel), video_root)
        except OutsideRootError as e:
            problems.append(f"{where}: {e}")
            continue
        is_frames = os.path.isdir(path)
        if check_files and not (is_frames or os.path.isfile(path)):
            problems.append(f"{where}: missing file {path}")
            continue
        records.append(VideoRecord(path, label, frames=is_frames, name=rel, root=video_root))
    return Annotations(records, classes or [str(i) for i in range(k)], problems)

