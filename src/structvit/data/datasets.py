"""The dataset readers and datasets under their former module name.

Each family has its own module: :mod:`.kinetics`, :mod:`.something` (SSv1/SSv2),
:mod:`.diving48`, :mod:`.finegym`, :mod:`.path_list`, :mod:`.imagenet`; the shared records
and helpers are in :mod:`.base`, the readers by name in :mod:`.readers` and the clip
dataset in :mod:`.video_dataset`.  This module re-exports them so that
``structvit.data.datasets.X`` keeps working.
"""
from __future__ import annotations

from .base import BENCHMARK_CLASSES, UNLABELLED, VIDEO_EXTENSIONS, Annotations, VideoRecord, normalize_split
from .diving48 import read_diving48
from .finegym import read_finegym
from .imagenet import ImageFolderDataset, read_devkit_ground_truth, read_loc_val_solution
from .kinetics import read_kinetics400
from .path_list import read_path_label_list
from .readers import READERS, canonical_name, read_annotations
from .something import read_ssv1, read_ssv2, ssv2_template_to_label
from .video_dataset import EvalItems, VideoDataset, skip_collate

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
    "canonical_name",
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
