"""LightningDataModules: one for images, one for video.

Both take plain constructor arguments (readable by ``LightningCLI`` from YAML), pick the
dataset by name, and leave the distributed sampler to Lightning (``Trainer`` swaps in a
``DistributedSampler`` when it runs on several devices), so the same module runs on one
CPU or many GPUs.

* :class:`ImageDataModule`: ``dataset="digits"`` (built in) or ``"imagenet"`` /
  ``"imagefolder"`` (class folders under ``root``).  Batches ``(B, 3, H, W)``.
* :class:`VideoDataModule`: ``dataset="moving_digits"`` (built in), ``"kinetics400"``,
  ``"ssv2"``, ``"ssv1"``, ``"diving48"``, ``"gym99"``, ``"gym288"``.  Training and
  validation batches ``(B, C, T, H, W)``; test batches ``(B, V, C, T, H, W)`` with
  ``V = num_clips * num_crops`` views to average when ``V > 1``.

Evaluation loaders leave unreadable samples out of their batches
(:func:`~structvit.data.video_dataset.skip_collate`) and count them (:meth:`num_skipped`)
instead of replacing them by a neighbour that would be scored twice; the prediction
loader's batches are ``[x, y, index, skipped]``, ``index`` the dataset positions (for the
file ids of ``predictions.csv``).
:meth:`eval_preprocessing` describes the evaluation pipeline (size, frames, sampling,
views, normalisation); the engine stores it in every checkpoint and ``structvit predict``
applies it to single files.
"""
from __future__ import annotations

from typing import Optional, Sequence

import lightning as L
from torch.utils.data import DataLoader

from ..ops.checks import is_int
from .builtin import MOVING_DIGITS_CLASSES, DigitsDataset, moving_digits_dataset
from .imagenet import ImageFolderDataset
from .readers import READERS, canonical_name, read_annotations
from .sampling import SAMPLING_MODES, FrameSampler
from .transforms import CROP_MODES, IMAGENET_MEAN, IMAGENET_STD, VideoTransform, build_image_transform
from .video_dataset import EvalItems, VideoDataset, skip_collate

__all__ = ["ImageDataModule", "VideoDataModule", "VIDEO_DEFAULTS", "IMAGE_DATASETS", "VIDEO_DATASETS",
           "build_datamodule"]

IMAGE_DATASETS = ("digits", "imagenet", "imagefolder")
VIDEO_DATASETS = ("moving_digits",) + tuple(READERS)

#: per-dataset defaults used when an argument is left as None
VIDEO_DEFAULTS = {
    "moving_digits": dict(sampling="dense", frame_stride=1, flip=False, input_size=32, crop="center"),
    "kinetics400": dict(sampling="dense", frame_stride=4, flip=True, input_size=224, crop="random_resized"),
    "ssv2": dict(sampling="segment", frame_stride=1, flip=False, input_size=224, crop="random_resized"),
    "ssv1": dict(sampling="segment", frame_stride=1, flip=False, input_size=224, crop="random_resized"),
    "diving48": dict(sampling="dense", frame_stride=2, flip=True, input_size=224, crop="random_resized"),
    "gym99": dict(sampling="dense", frame_stride=2, flip=True, input_size=224, crop="random_resized"),
    "gym288": dict(sampling="dense", frame_stride=2, flip=True, input_size=224, crop="random_resized"),
}


def _check_int(name, v, lo=0):
    if not is_int(v):
        raise TypeError(f"{name} must be an int, got {v!r}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return v


class _Base(L.LightningDataModule):
    def _loader_checks(self, batch_size, num_workers):
        _check_int("batch_size", batch_size, 1)
        _check_int("num_workers", num_workers, 0)

    def _loader(self, ds, *, shuffle: bool, drop_last: bool = False, evaluation: bool = False,
                indexed: bool = False) -> DataLoader:
        nw = self.hparams.num_workers
        return DataLoader(
            EvalItems(ds) if indexed else ds, batch_size=self.hparams.batch_size, shuffle=shuffle, num_workers=nw,
            pin_memory=bool(self.hparams.pin_memory), persistent_workers=bool(self.hparams.persistent_workers) and nw > 0,
            drop_last=drop_last and len(ds) > self.hparams.batch_size,
            collate_fn=skip_collate if evaluation else None,
        )

    def _get(self, key, stage):
        """The dataset of ``key`` (train/val/test), set up for ``stage`` on first use."""
        if key not in self._datasets:
            self.setup(stage)
        return self._datasets[key]

    def train_dataloader(self):
        return self._loader(self._get("train", "fit"), shuffle=True, drop_last=self.hparams.drop_last)

    def val_dataloader(self):
        return self._loader(self._get("val", "validate"), shuffle=False, evaluation=True)

    def test_dataloader(self):
        return self._loader(self._get("test", "test"), shuffle=False, evaluation=True)

    def predict_dataloader(self):
        return self._loader(self._get("test", "predict"), shuffle=False, evaluation=True, indexed=True)

    def num_skipped(self, key: str) -> int:
        """Unreadable samples the ``key`` (``val``/``test``) dataset has left out so far (all workers)."""
        ds = self._datasets.get(key)
        return int(getattr(ds, "num_bad_samples", 0)) if ds is not None else 0

    @property
    def num_bad_samples(self) -> int:
        """Unreadable files met so far (replaced in training, skipped in evaluation), over
        all datasets of this module."""
        return sum(getattr(d, "num_bad_samples", 0) for d in self._datasets.values())

    def sample_ids(self, key: str = "test") -> list[str]:
        """One id per sample of the ``key`` dataset (``train``/``val``/``test``): file or video
        ids where the dataset has them, else the position."""
        ds = self._get(key, {"train": "fit", "val": "validate"}.get(key, "predict"))
        ids = getattr(ds, "sample_ids", None)
        return list(ids) if ids is not None else [str(i) for i in range(len(ds))]


class ImageDataModule(_Base):
    """Images: ``digits`` (built in, 32x32) or ImageNet-style class folders.

    ``randaugment`` / ``random_erasing`` / ``hflip`` apply to folder datasets through timm's
    ``create_transform``; ``digits`` uses small random shifts in training instead.
    """

    def __init__(
        self,
        dataset: str = "digits",
        root: Optional[str] = None,
        train_split: str = "train",
        val_split: str = "val",
        test_split: Optional[str] = None,
        input_size: Optional[int] = None,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        randaugment: Optional[str] = "rand-m9-mstd0.5-inc1",
        random_erasing: float = 0.25,
        hflip: float = 0.5,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        drop_last: bool = True,
    ):
        super().__init__()
        if not isinstance(dataset, str):
            raise TypeError(f"dataset must be a string, got {dataset!r}")
        dataset = dataset.lower()
        if dataset not in IMAGE_DATASETS:
            raise ValueError(f"dataset must be one of {IMAGE_DATASETS}, got {dataset!r}")
        if dataset != "digits" and root is None:
            raise ValueError(f"root is required for dataset {dataset!r}")
        self._loader_checks(batch_size, num_workers)
        if input_size is None:
            input_size = 32 if dataset == "digits" else 224
        _check_int("input_size", input_size, 8)
        if not 0 <= random_erasing <= 1:
            raise ValueError(f"random_erasing must be in [0, 1], got {random_erasing}")
        self.save_hyperparameters()
        self.hparams.dataset = dataset
        self.hparams.input_size = input_size
        self._datasets: dict = {}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def classes(self) -> list[str]:
        if self.hparams.dataset == "digits":
            return list(DigitsDataset.classes)
        return ImageFolderDataset.find_classes(self.hparams.root)

    def eval_preprocessing(self) -> dict:
        """How an image is prepared for evaluation (stored in checkpoints, used by ``structvit
        predict``): ``resize`` ``"full"`` (the whole image to ``input_size`` squared, bilinear:
        the built-in digits) or ``"crop"`` (timm's eval transform: short side to
        ``input_size / crop_pct``, centre crop, ``interpolation``)."""
        hp = self.hparams
        out = {"kind": "image", "dataset": hp.dataset, "input_size": int(hp.input_size),
               "mean": [float(v) for v in hp.mean], "std": [float(v) for v in hp.std]}
        if hp.dataset == "digits":
            out.update(resize="full", interpolation="bilinear", crop_pct=1.0)
        else:
            out.update(resize="crop", interpolation="bicubic", crop_pct=0.875 if hp.input_size >= 64 else 1.0)
        return out

    def _make(self, split: str, train: bool):
        hp = self.hparams
        if hp.dataset == "digits":
            return DigitsDataset(split, size=hp.input_size, augment=train, mean=hp.mean, std=hp.std)
        tf = build_image_transform(hp.input_size, train=train, randaugment=hp.randaugment,
                                   random_erasing=hp.random_erasing, hflip=hp.hflip, mean=hp.mean, std=hp.std)
        return ImageFolderDataset(hp.root, split, transform=tf, classes=self.classes,
                                  on_unreadable="replace" if train else "skip")

    def setup(self, stage: Optional[str] = None):
        hp = self.hparams
        if stage in (None, "fit") and "train" not in self._datasets:
            self._datasets["train"] = self._make(hp.train_split, True)
        if stage in (None, "fit", "validate") and "val" not in self._datasets:
            self._datasets["val"] = self._make(hp.val_split, False)
        if stage in (None, "test", "predict") and "test" not in self._datasets:
            self._datasets["test"] = self._make(hp.test_split or hp.val_split, False)


class VideoDataModule(_Base):
    """Video clips from the built-in ``moving_digits`` or a benchmark in its official layout.

    Arguments left as ``None`` take the dataset's default (:data:`VIDEO_DEFAULTS`):
    ``sampling`` (``"dense"`` or ``"segment"``), ``frame_stride``, ``flip`` (off for
    Something-Something and moving digits, whose labels depend on left/right),
    ``input_size`` and the training ``crop`` (``"random_resized"``, ``"multi_scale"``,
    ``"center"``).  Validation uses one centre view per video (or the test views when
    ``val_multiview``); testing returns ``num_clips x num_crops`` views per video.
    ``moving_digits_seed`` and ``moving_digits_options`` (e.g. ``{"num_distractors": 3}``)
    configure the built-in data; ``reader_options`` go to the benchmark reader (e.g.
    ``{"annotation_file": "train_list.txt"}`` for Kinetics "path label" lists).
    """

    def __init__(
        self,
        dataset: str = "moving_digits",
        root: Optional[str] = None,
        train_split: str = "train",
        val_split: str = "val",
        test_split: Optional[str] = None,
        num_frames: int = 8,
        sampling: Optional[str] = None,
        frame_stride: Optional[int] = None,
        input_size: Optional[int] = None,
        test_short_side: Optional[int] = None,
        batch_size: int = 16,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        num_clips: int = 1,
        num_crops: int = 1,
        val_multiview: bool = False,
        flip: Optional[bool] = None,
        randaugment: Optional[str] = None,
        random_erasing: float = 0.0,
        crop: Optional[str] = None,
        scale: Sequence[float] = (0.25, 1.0),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        max_retries: int = 10,
        on_problem: str = "warn",
        drop_last: bool = True,
        moving_digits_seed: int = 0,
        moving_digits_options: Optional[dict] = None,
        reader_options: Optional[dict] = None,
    ):
        super().__init__()
        name = canonical_name(dataset)
        if name not in VIDEO_DATASETS:
            raise ValueError(f"dataset must be one of {VIDEO_DATASETS}, got {dataset!r}")
        if name != "moving_digits" and root is None:
            raise ValueError(f"root is required for dataset {dataset!r}")
        self._loader_checks(batch_size, num_workers)
        _check_int("num_frames", num_frames, 1)
        _check_int("num_clips", num_clips, 1)
        _check_int("num_crops", num_crops, 1)
        d = VIDEO_DEFAULTS[name]
        sampling = sampling if sampling is not None else d["sampling"]
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
        frame_stride = _check_int("frame_stride", frame_stride if frame_stride is not None else d["frame_stride"], 1)
        crop = crop if crop is not None else d["crop"]
        if crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {CROP_MODES}, got {crop!r}")
        input_size = _check_int("input_size", input_size if input_size is not None else d["input_size"], 8)
        flip = d["flip"] if flip is None else flip
        if not isinstance(flip, bool):
            raise TypeError(f"flip must be a bool or None, got {flip!r}")
        if on_problem not in ("warn", "raise"):
            raise ValueError(f"on_problem must be 'warn' or 'raise', got {on_problem!r}")
        if name == "moving_digits" and num_frames % 2:
            raise ValueError(f"num_frames must be even for moving_digits, got {num_frames}")
        self.save_hyperparameters()
        hp = self.hparams
        hp.dataset, hp.sampling, hp.frame_stride, hp.crop, hp.input_size, hp.flip = (
            name, sampling, frame_stride, crop, input_size, flip)
        # build the transforms now so that bad values fail at construction
        self._transform(True), self._transform(False, hp.num_crops)
        self._datasets: dict = {}
        self._classes = None

    # -- pieces ---------------------------------------------------------------------------
    def _transform(self, train: bool, num_crops: int = 1) -> VideoTransform:
        hp = self.hparams
        return VideoTransform(
            hp.input_size, train=train, crop=hp.crop, scale=tuple(hp.scale), flip=hp.flip,
            randaugment=hp.randaugment, random_erasing=hp.random_erasing, mean=hp.mean, std=hp.std,
            num_crops=num_crops, test_short_side=hp.test_short_side,
        )

    def _sampler(self, num_clips: int = 1) -> FrameSampler:
        hp = self.hparams
        return FrameSampler(hp.sampling, num_frames=hp.num_frames, frame_stride=hp.frame_stride, num_clips=num_clips)

    @property
    def classes(self) -> list[str]:
        if self._classes is None:
            hp = self.hparams
            if hp.dataset == "moving_digits":
                self._classes = list(MOVING_DIGITS_CLASSES)
            else:  # from the official files, without touching the videos
                self._classes = read_annotations(hp.dataset, hp.root, hp.train_split, check_files=False,
                                                 **(hp.reader_options or {})).classes
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def eval_preprocessing(self) -> dict:
        """How a video is prepared for testing (stored in checkpoints, used by ``structvit
        predict``): frames (sampling, count, stride), test views (clips x crops), size and
        normalisation."""
        hp = self.hparams
        return {"kind": "video", "dataset": hp.dataset, "input_size": int(hp.input_size),
                "test_short_side": int(hp.test_short_side or hp.input_size), "num_frames": int(hp.num_frames),
                "sampling": hp.sampling, "frame_stride": int(hp.frame_stride), "num_clips": int(hp.num_clips),
                "num_crops": int(hp.num_crops), "mean": [float(v) for v in hp.mean], "std": [float(v) for v in hp.std]}

    def make_dataset(self, split: str, *, train: bool, num_clips: int = 1, num_crops: int = 1) -> VideoDataset:
        hp = self.hparams
        sampler, transform = self._sampler(num_clips), self._transform(train, num_crops)
        if hp.dataset == "moving_digits":
            return moving_digits_dataset(split, sampler=sampler, transform=transform, train=train,
                                         seed=hp.moving_digits_seed, num_frames=hp.num_frames,
                                         **(hp.moving_digits_options or {}))
        ann = read_annotations(hp.dataset, hp.root, split, **(hp.reader_options or {}))
        return VideoDataset(ann, sampler=sampler, transform=transform, train=train,
                            on_problem=hp.on_problem, max_retries=hp.max_retries)

    def setup(self, stage: Optional[str] = None):
        hp = self.hparams
        if stage in (None, "fit") and "train" not in self._datasets:
            self._datasets["train"] = self.make_dataset(hp.train_split, train=True)
        if stage in (None, "fit", "validate") and "val" not in self._datasets:
            k, c = (hp.num_clips, hp.num_crops) if hp.val_multiview else (1, 1)
            self._datasets["val"] = self.make_dataset(hp.val_split, train=False, num_clips=k, num_crops=c)
        if stage in (None, "test", "predict") and "test" not in self._datasets:
            self._datasets["test"] = self.make_dataset(hp.test_split or hp.val_split, train=False,
                                                       num_clips=hp.num_clips, num_crops=hp.num_crops)


def build_datamodule(dataset: str, **kwargs) -> L.LightningDataModule:
    """The data module of ``dataset``: images for ``digits``/``imagenet``/``imagefolder``,
    video otherwise."""
    if isinstance(dataset, str) and dataset.lower() in IMAGE_DATASETS:
        return ImageDataModule(dataset, **kwargs)
    return VideoDataModule(dataset, **kwargs)
