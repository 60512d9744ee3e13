"""Diving-48 (V2) in its official layout.

``Diving48_V2_{train,test}.json`` (``vid_name, label, start_frame, end_frame``; ``val``
means ``test``), optional ``Diving48_vocab.json``; videos ``{root}/rgb/{vid_name}.mp4`` or
frame folders ``{root}/frames/{vid_name}/``.
"""
from __future__ import annotations

import os

from .base import Annotations, VideoRecord, _first, _locate, normalize_split
from .files import PathGuard, load_json

__all__ = ["read_diving48"]


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
        vocab = load_json(vocab_path, list)
        classes = [" ".join(v) if isinstance(v, list) else str(v) for v in vocab]
    else:
        classes = [str(i) for i in range(48)]
    vdirs = [p for p in (os.path.join(root, "rgb"), os.path.join(root, "videos"), root) if os.path.isdir(p)]
    fdirs = [p for p in (os.path.join(root, "frames"), os.path.join(root, "rawframes"),
                         os.path.join(root, "rgb_frames")) if os.path.isdir(p)]
    entries = load_json(ann, list)
    problems, records, guard = [], [], PathGuard()
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            problems.append(f"{ann} entry {i}: expected a JSON object, got {type(e).__name__}")
            continue
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
        lookups = ([(vdirs, dict(allow_frames=False))] if media != "frames" else []) + (
            [(fdirs, dict(prefer="frames"))] if media != "video" else [])
        found = _locate(where, problems, vid, root, lookups, check_files=check_files, guard=guard,
                        missing="" if media == "frames" else ".mp4", missing_frames=media == "frames")
        if found is not None:
            records.append(VideoRecord(label=label, start_frame=start, end_frame=end, name=vid, **found))
    return Annotations(records, classes, problems)

