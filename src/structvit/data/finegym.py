"""FineGym (Gym99 / Gym288) element lists in their official layout.

``gym99_train_element_v1.1.txt``, ``gym99_val_element.txt`` (``clip_id label`` lines),
optional ``gym99_categories.txt``; clips ``{root}/subactions/{clip_id}.mp4`` (or
``clips``/``videos``) or frame folders.
"""
from __future__ import annotations

import os
import re

from .base import Annotations, VideoRecord, _annotation_lines, _first, _locate, normalize_split
from .files import PathGuard

__all__ = ["read_finegym"]


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
        for _, line in _annotation_lines(cat):
            m = re.match(r"\s*Clabel:\s*(\d+);.*?;\s*Glabel:\s*\d+;\s*(.*)$", line)
            if m:
                names_by_label[int(m.group(1))] = m.group(2).strip()
        classes = [names_by_label.get(i, str(i)) for i in range(k)]
    vdirs = [p for p in (os.path.join(root, "subactions"), os.path.join(root, "clips"), os.path.join(root, "videos"),
                         root) if os.path.isdir(p)]
    fdirs = [p for p in (os.path.join(root, "frames"), os.path.join(root, "subaction_frames"), os.path.join(root, "rawframes"))
             if os.path.isdir(p)]
    problems, records, guard = [], [], PathGuard()
    for where, line in _annotation_lines(ann):
        parts = line.split()
        if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
            problems.append(f"{where}: expected 'clip_id label', got {line!r}")
            continue
        clip, label = parts[0], int(parts[1])
        if not 0 <= label < k:
            problems.append(f"{where}: unknown label {label} (expected 0..{k - 1})")
            continue
        found = _locate(where, problems, clip, root, [(vdirs, dict(prefer="video")), (fdirs, dict(prefer="frames"))],
                        check_files=check_files, guard=guard, missing=".mp4")
        if found is not None:
            records.append(VideoRecord(label=label, name=clip, **found))
    return Annotations(records, classes, problems)

