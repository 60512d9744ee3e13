"""Data: built-in digits / moving digits, the six benchmark readers, video decoding,
frame sampling, clip-consistent transforms and Lightning data modules.

Quick start (no download)::

    from structvit.data import VideoDataModule
    dm = VideoDataModule("moving_digits", batch_size=32)
    dm.setup("fit")
    clips, labels = next(iter(dm.train_dataloader()))   # (32, 3, 8, 32, 32), (32,)
"""
from .builtin import (
    MOVING_DIGITS_CLASSES,
    TIME_PAIRS,
    DigitsDataset,
    digits_split,
    load_digit_images,
    make_moving_digits,
    moving_digits_dataset,
)
from .datamodule import IMAGE_DATASETS, VIDEO_DATASETS, ImageDataModule, VideoDataModule, build_datamodule
from .base import Annotations, VideoRecord
from .diving48 import read_diving48
from .files import AnnotationError, OutsideRootError, UnsupportedImageError
from .finegym import read_finegym
from .imagenet import ImageFolderDataset
from .images import load_image
from .kinetics import read_kinetics400
from .path_list import read_path_label_list
from .readers import READERS, read_annotations
from .something import read_ssv1, read_ssv2, ssv2_template_to_label
from .sampling import FrameSampler, dense_indices, segment_indices
from .transforms import IMAGENET_MEAN, IMAGENET_STD, VideoTransform, build_image_transform
from .video import (
    CorruptFileError,
    DataFileError,
    MissingFileError,
    probe_video,
    read_frame_folder,
    read_video_frames,
    write_video,
)
from .video_dataset import VideoDataset

__all__ = [
    "MOVING_DIGITS_CLASSES", "TIME_PAIRS", "DigitsDataset", "digits_split", "load_digit_images",
    "make_moving_digits", "moving_digits_dataset",
    "IMAGE_DATASETS", "VIDEO_DATASETS", "ImageDataModule", "VideoDataModule", "build_datamodule",
    "READERS", "Annotations", "ImageFolderDataset", "VideoDataset", "VideoRecord", "read_annotations",
    "read_diving48", "read_finegym", "read_kinetics400", "read_path_label_list", "read_ssv1", "read_ssv2",
    "ssv2_template_to_label",
    "FrameSampler", "dense_indices", "segment_indices",
    "IMAGENET_MEAN", "IMAGENET_STD", "VideoTransform", "build_image_transform",
    "CorruptFileError", "DataFileError", "MissingFileError", "probe_video", "read_frame_folder",
    "read_video_frames", "write_video",
    "AnnotationError", "OutsideRootError", "UnsupportedImageError", "load_image",
]
