"""The video benchmark readers by name (``read_annotations("ssv2", root, "val")``)."""
from __future__ import annotations

import os
from typing import Callable

from .base import Annotations
from .diving48 import read_diving48
from .finegym import read_finegym
from .kinetics import read_kinetics400
from .something import read_ssv1, read_ssv2

__all__ = ["READERS", "read_annotations", "canonical_name"]


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
