"""Something-Something V1 and V2 in their official layouts.

* ``ssv2``: ``labels/{labels,train,validation,test}.json`` (as Qualcomm distributes it) or
  the older ``something-something-v2-{labels,train,validation,test}.json``, in
  ``{root}/labels``, ``{root}/annotations`` or ``{root}``; videos
  ``{root}/20bn-something-something-v2/{id}.webm`` (or ``{root}/videos``).  Label = the
  labels-JSON index of the template with its brackets removed; ``test.json`` has no
  templates: labels from ``test-answers.csv`` (``id;label``) next to it, else unlabelled.
* ``ssv1``: ``something-something-v1-{labels,train,validation}.csv`` (``;``-separated
  ``id;label``; labels file: one class per line, line order = label); frames
  ``{root}/20bn-something-something-v1/{id}/00001.jpg`` ...
"""
from __future__ import annotations

import os

from .base import UNLABELLED, Annotations, VideoRecord, _annotation_lines, _locate, normalize_split
from .files import AnnotationError, PathGuard, load_json

__all__ = ["read_ssv2", "read_ssv1", "ssv2_template_to_label"]


def ssv2_template_to_label(template: str) -> str:
    """``"Putting [something] on [something]"`` -> ``"Putting something on something"``."""
    return template.replace("[", "").replace("]", "")


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
    labels = load_json(labels_path, dict)
    try:
        label_map = {str(k): int(v) for k, v in labels.items()}
    except (TypeError, ValueError) as e:
        raise AnnotationError(labels_path, f"expected {{template: index}} ({e})") from None
    classes = [None] * len(label_map)
    problems = []
    for k, v in label_map.items():
        if not 0 <= v < len(classes) or classes[v] is not None:
            raise AnnotationError(labels_path, f"label indices must be a permutation of 0..{len(classes) - 1}")
        classes[v] = k
    vdirs = [p for p in (os.path.join(root, "20bn-something-something-v2"), os.path.join(root, "videos"), root)
             if os.path.isdir(p)]
    entries = load_json(ann, list)
    answers = _ssv2_test_answers(ann, root, problems) if normalize_split(split) == "test" else None
    records, guard = [], PathGuard()
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            problems.append(f"{ann} entry {i}: expected a JSON object, got {type(e).__name__}")
            continue
        where = f"{ann} entry {i} (id {e.get('id')!r})"
        if "id" not in e:
            problems.append(f"{where}: no id")
            continue
        if isinstance(e.get("template"), str):
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
        found = _locate(where, problems, vid, root, [(vdirs, dict(exts=(".webm", ".mp4")))],
                        check_files=check_files, guard=guard, missing=".webm")
        if found is not None:
            records.append(VideoRecord(label=UNLABELLED if lab is None else label_map[lab], name=vid, **found))
    return Annotations(records, classes, problems)


def _ssv2_test_answers(ann: str, root: str, problems: list) -> dict:
    """``{id: class name}`` from ``test-answers.csv`` (``id;label`` lines) in the folder of the
    test JSON or its parent inside ``root``; empty if there is none (the test split is then
    unlabelled)."""
    d = os.path.dirname(os.path.abspath(ann))
    folders = [d] + ([os.path.dirname(d)] if os.path.realpath(d) != os.path.realpath(root) else [])
    path = next((p for p in (os.path.join(f, "test-answers.csv") for f in folders) if os.path.isfile(p)), None)
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
    classes = [line for _, line in _annotation_lines(labels_path)]
    index = {c: i for i, c in enumerate(classes)}
    if len(index) != len(classes):
        raise ValueError(f"{labels_path}: duplicate class names")
    fdirs = [p for p in (os.path.join(root, "20bn-something-something-v1"), os.path.join(root, "frames"), root)
             if os.path.isdir(p)]
    problems, records, guard = [], [], PathGuard()
    for where, line in _annotation_lines(ann):
        parts = line.split(";", 1)
        if len(parts) != 2:
            problems.append(f"{where}: expected 'id;label', got {line!r}")
            continue
        vid, lab = parts[0].strip(), parts[1].strip()
        if lab not in index:
            problems.append(f"{where}: unknown label {lab!r}")
            continue
        found = _locate(where, problems, vid, root, [(fdirs, dict(prefer="frames"))], check_files=check_files, guard=guard,
                        missing="", missing_frames=True)
        if found is not None:
            records.append(VideoRecord(label=index[lab], name=vid, **found))
    return Annotations(records, classes, problems)

