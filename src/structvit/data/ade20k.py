"""ADE20K (SceneParsing, ``ADEChallengeData2016``) for semantic segmentation, read as distributed.

Layout (``root`` is the ``ADEChallengeData2016`` folder or the folder holding it)::

    images/training/ADE_train_00000001.jpg       annotations/training/ADE_train_00000001.png
    images/validation/ADE_val_00000001.jpg       annotations/validation/ADE_val_00000001.png

An annotation is a single-channel PNG of the image's size: 0 = "other" (ignored), 1..150 the
classes. As mmseg's ``reduce_zero_label=True``: 0 becomes the ignore index 255 and class k
becomes k - 1 (0..149). Any dataset in this layout works (images ``.jpg`` or ``.png``, e.g.
``structvit data export --dataset scenes --format ade20k``); ``num_classes`` is then its count
of labels (1..num_classes), and an optional ``classes.txt`` (one name a line) names them.

Pipelines (mmseg's ADE20K config, which UniFormer's Semantic FPN uses):

- train: resize keeping the ratio into ``scale`` (2048, 512) times a random ratio in
  [0.5, 2.0]; random 512 x 512 crop (``cat_max_ratio`` 0.75: up to 10 tries for a crop no
  class fills more than 75% of); horizontal flip 0.5; photometric distortion (brightness,
  contrast, saturation, hue, each with probability 0.5); normalise (ImageNet mean / std);
  pad to the crop with 0 (image) / 255 (label).
- val / test: resize keeping the ratio into (2048, 512); the label stays at its original
  size (the module resizes the logits back to it, as mmseg evaluates).
"""
from __future__ import annotations

import os
import random
from typing import Optional, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["IGNORE_INDEX", "ADE20K_NUM_CLASSES", "SPLIT_FOLDERS", "ade20k_root", "ade20k_pairs", "read_label",
           "read_class_names", "SegTrainTransform", "SegEvalTransform", "ADE20KDataset", "collate_segmentation",
           "ADE20KDataModule", "check_ade20k"]

IGNORE_INDEX = 255
ADE20K_NUM_CLASSES = 150
#: split name -> ADE20K's folder name
SPLIT_FOLDERS = {"train": "training", "training": "training", "val": "validation", "validation": "validation",
                 "test": "validation"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def ade20k_root(root) -> str:
    """``root`` itself if it holds ``images/`` and ``annotations/``, else ``root/ADEChallengeData2016``."""
    root = os.fspath(root)
    for candidate in (root, os.path.join(root, "ADEChallengeData2016")):
        if os.path.isdir(os.path.join(candidate, "images")) and os.path.isdir(os.path.join(candidate, "annotations")):
            return candidate
    raise FileNotFoundError(f"root must be an ADE20K folder (ADEChallengeData2016 with images/ and annotations/, "
                            f"or the folder holding it), got {root!r}")


def _split_folder(split: str) -> str:
    if split not in SPLIT_FOLDERS:
        raise ValueError(f"split must be one of {sorted(SPLIT_FOLDERS)}, got {split!r}")
    return SPLIT_FOLDERS[split]


def ade20k_pairs(root, split: str) -> list[tuple[str, str]]:
    """(image, annotation) paths of ``split``, sorted by name; the annotation is
    ``annotations/<split>/<image stem>.png`` (it may be missing: :func:`check_ade20k` says so)."""
    base = ade20k_root(root)
    folder = _split_folder(split)
    images = os.path.join(base, "images", folder)
    if not os.path.isdir(images):
        raise FileNotFoundError(f"{images}: no such folder (split {split!r} of the ADE20K layout)")
    pairs = []
    for name in sorted(os.listdir(images)):
        stem, ext = os.path.splitext(name)
        if ext.lower() in IMAGE_EXTENSIONS and not name.startswith("."):
            pairs.append((os.path.join(images, name), os.path.join(base, "annotations", folder, stem + ".png")))
    return pairs


def read_class_names(root, num_classes: int) -> list[str]:
    """``classes.txt`` of the dataset folder (one name a line) if present, else "class 1".."class N"."""
    path = os.path.join(ade20k_root(root), "classes.txt")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
        if len(names) == num_classes:
            return names
    return [f"class {k + 1}" for k in range(num_classes)]


def read_label(path: str, reduce_zero_label: bool = True) -> np.ndarray:
    """A label PNG as (H, W) uint8; with ``reduce_zero_label`` 0 -> 255 (ignore) and k -> k - 1."""
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"{path}: an annotation must be a single-channel PNG (mode L or P), got mode {im.mode}")
        label = np.array(im)
    if label.max(initial=0) > 255:
        raise ValueError(f"{path}: label values must be below 256, got {int(label.max())}")
    label = label.astype(np.uint8)
    if reduce_zero_label:
        label = np.where(label == 0, IGNORE_INDEX, label.astype(np.int64) - 1).astype(np.uint8)
    return label


def _read_image(path: str) -> torch.Tensor:
    """(3, H, W) float in [0, 1]."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def _rescale_size(h: int, w: int, scale: Sequence[int]) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size with long side <= max(scale) and short side <= min(scale)."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def _resize(image: torch.Tensor, label: Optional[torch.Tensor], size: tuple[int, int]):
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    if label is not None:
        label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].to(label.dtype)
    return image, label


def _normalise(image: torch.Tensor, mean, std) -> torch.Tensor:
    return (image - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def _photometric(image: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion on a [0, 1] image: brightness +-32/255, contrast and
    saturation x[0.5, 1.5], hue +-18 degrees, each with probability 0.5."""
    from torchvision.transforms.v2 import functional as TF

    if rng.random() < 0.5:
        image = (image + rng.uniform(-32, 32) / 255.0).clamp(0, 1)
    if rng.random() < 0.5:
        image = TF.adjust_contrast(image, rng.uniform(0.5, 1.5))
    if rng.random() < 0.5:
        image = TF.adjust_saturation(image, rng.uniform(0.5, 1.5))
    if rng.random() < 0.5:
        image = TF.adjust_hue(image, rng.uniform(-18, 18) / 360.0)
    return image


class SegTrainTransform:
    """The training pipeline (module docstring). ``__call__(image (3, H, W) in [0, 1], label (H, W) uint8)``
    -> (normalised image (3, crop, crop), label (crop, crop) int64 with 255 = ignore)."""

    def __init__(self, crop_size: int = 512, scale: Sequence[int] = (2048, 512),
                 ratio_range: Sequence[float] = (0.5, 2.0), cat_max_ratio: float | None = 0.75, flip: float = 0.5,
                 photometric: bool = True, mean=IMAGENET_MEAN, std=IMAGENET_STD, seed: int | None = None):
        if not isinstance(crop_size, int) or crop_size < 1:
            raise ValueError(f"crop_size must be a positive int, got {crop_size!r}")
        if len(tuple(ratio_range)) != 2 or not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(f"ratio_range must be (low, high) with 0 < low <= high, got {ratio_range!r}")
        if cat_max_ratio is not None and not 0 < cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio must be None or in (0, 1], got {cat_max_ratio!r}")
        self.crop_size, self.scale, self.ratio_range = crop_size, tuple(scale), tuple(ratio_range)
        self.cat_max_ratio, self.flip, self.photometric = cat_max_ratio, flip, photometric
        self.mean, self.std = tuple(mean), tuple(std)
        self.rng = random.Random(seed)

    def _crop_box(self, label: torch.Tensor) -> tuple[int, int, int, int]:
        h, w = label.shape
        ch, cw = min(self.crop_size, h), min(self.crop_size, w)
        box = (0, 0, ch, cw)
        for _ in range(10 if self.cat_max_ratio is not None else 1):
            top, left = self.rng.randint(0, h - ch), self.rng.randint(0, w - cw)
            box = (top, left, ch, cw)
            if self.cat_max_ratio is None:
                break
            crop = label[top:top + ch, left:left + cw]
            counts = torch.bincount(crop[crop != IGNORE_INDEX].flatten().long())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio:
                break
        return box

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ratio = self.rng.uniform(*self.ratio_range)
        size = _rescale_size(image.shape[1], image.shape[2], [s * ratio for s in self.scale])
        image, label = _resize(image, label, size)
        top, left, ch, cw = self._crop_box(label)
        image, label = image[:, top:top + ch, left:left + cw], label[top:top + ch, left:left + cw]
        if self.rng.random() < self.flip:
            image, label = image.flip(-1), label.flip(-1)
        if self.photometric:
            image = _photometric(image, self.rng)
        image = _normalise(image, self.mean, self.std)
        out_image = image.new_zeros(3, self.crop_size, self.crop_size)
        out_label = torch.full((self.crop_size, self.crop_size), IGNORE_INDEX, dtype=torch.int64)
        out_image[:, :ch, :cw] = image
        out_label[:ch, :cw] = label.long()
        return out_image, out_label


class SegEvalTransform:
    """Resize keeping the ratio into ``scale`` (long side <= 2048, short side <= 512) and
    normalise; the label is returned unchanged (original size)."""

    def __init__(self, scale: Sequence[int] = (2048, 512), mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.scale, self.mean, self.std = tuple(scale), tuple(mean), tuple(std)

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image, _ = _resize(image, None, _rescale_size(image.shape[1], image.shape[2], self.scale))
        return _normalise(image, self.mean, self.std), label.long()


class ADE20KDataset(torch.utils.data.Dataset):
    """``split`` of an ADE20K-layout folder: items ``dict(image, label, image_size, label_size, path)``.

    Args:
        root: ``ADEChallengeData2016`` or the folder holding it.
        split: "train" / "training" or "val" / "validation" ("test" reads validation).
        transform: ``(image, label) -> (image, label)``; default :class:`SegEvalTransform` for
            val and :class:`SegTrainTransform` for train.
        num_classes: labels 1..num_classes are classes (150 for ADE20K); a label above it is an error.
        reduce_zero_label: 0 -> ignore, k -> k - 1 (ADE20K's convention).
    """

    def __init__(self, root, split: str = "train", transform=None, num_classes: int = ADE20K_NUM_CLASSES,
                 reduce_zero_label: bool = True):
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or not 1 <= num_classes <= 254:
            raise ValueError(f"num_classes must be an int in [1, 254] (255 is ignore), got {num_classes!r}")
        self.root, self.split, self.num_classes = ade20k_root(root), split, num_classes
        self.reduce_zero_label = reduce_zero_label
        self.pairs = ade20k_pairs(self.root, split)
        if not self.pairs:
            raise FileNotFoundError(f"{self.root}: no images in images/{_split_folder(split)}")
        if transform is None:
            transform = SegTrainTransform() if _split_folder(split) == "training" else SegEvalTransform()
        self.transform = transform
        self.classes = read_class_names(self.root, num_classes)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        image_path, label_path = self.pairs[index]
        if not os.path.isfile(label_path):
            raise FileNotFoundError(f"{label_path}: annotation of {image_path} missing")
        image = _read_image(image_path)
        label = torch.from_numpy(read_label(label_path, self.reduce_zero_label))
        if tuple(label.shape) != tuple(image.shape[1:]):
            raise ValueError(f"{label_path}: annotation is {label.shape[1]}x{label.shape[0]}, its image "
                             f"{image.shape[2]}x{image.shape[1]}")
        top = self.num_classes - 1 if self.reduce_zero_label else self.num_classes
        bad = (label != IGNORE_INDEX) & (label > top)
        if bad.any():
            raise ValueError(f"{label_path}: label value {int(label[bad].max()) + int(self.reduce_zero_label)} above "
                             f"num_classes={self.num_classes}")
        image, label = self.transform(image, label)
        return dict(image=image, label=label, image_size=torch.tensor(image.shape[1:]),
                    label_size=torch.tensor(label.shape), path=image_path)


def collate_segmentation(batch: list[dict]) -> dict:
    """Stack items of different sizes: images padded bottom/right with 0, labels with 255;
    ``image_size`` / ``label_size`` (B, 2) give each item's own size."""
    h = max(item["image"].shape[1] for item in batch)
    w = max(item["image"].shape[2] for item in batch)
    lh = max(item["label"].shape[0] for item in batch)
    lw = max(item["label"].shape[1] for item in batch)
    images = batch[0]["image"].new_zeros(len(batch), 3, h, w)
    labels = torch.full((len(batch), lh, lw), IGNORE_INDEX, dtype=torch.int64)
    for i, item in enumerate(batch):
        ih, iw = item["image"].shape[1:]
        images[i, :, :ih, :iw] = item["image"]
        labels[i, :item["label"].shape[0], :item["label"].shape[1]] = item["label"]
    return dict(image=images, label=labels, image_size=torch.stack([b["image_size"] for b in batch]),
                label_size=torch.stack([b["label_size"] for b in batch]), path=[b["path"] for b in batch])


class ADE20KDataModule(L.LightningDataModule):
    """Train / val loaders over an ADE20K-layout folder (the paper's Semantic FPN recipe by default).

    Args:
        root: ``ADEChallengeData2016`` or the folder holding it.
        num_classes: 150 for ADE20K; the count of labels of another dataset in the layout.
        batch_size: training crops per step (16 in the paper's recipe, over all devices).
        val_batch_size: images per validation step (1 as mmseg; larger batches are padded).
        crop_size, scale, ratio_range, cat_max_ratio, flip, photometric: the training pipeline.
        test_scale: the evaluation resize bound (long, short).
        num_workers: loader processes.
        seed: the training pipeline's random seed (None: unseeded).
    """

    def __init__(self, root: str = "data/ade/ADEChallengeData2016", num_classes: int = ADE20K_NUM_CLASSES,
                 batch_size: int = 16, val_batch_size: int = 1, crop_size: int = 512,
                 scale: tuple[int, int] = (2048, 512), ratio_range: tuple[float, float] = (0.5, 2.0),
                 cat_max_ratio: float | None = 0.75, flip: float = 0.5, photometric: bool = True,
                 test_scale: tuple[int, int] = (2048, 512), num_workers: int = 4, seed: int | None = None):
        super().__init__()
        for name, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.save_hyperparameters()
        self.root, self.num_classes = root, num_classes
        self.batch_size, self.val_batch_size, self.num_workers = batch_size, val_batch_size, num_workers
        self.train_transform = SegTrainTransform(crop_size, scale, ratio_range, cat_max_ratio, flip, photometric,
                                                 seed=seed)
        self.eval_transform = SegEvalTransform(test_scale)
        self.train_set = self.val_set = None

    @property
    def classes(self) -> list[str]:
        return read_class_names(self.root, self.num_classes)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = ADE20KDataset(self.root, "train", self.train_transform, self.num_classes)
        if self.val_set is None:
            self.val_set = ADE20KDataset(self.root, "val", self.eval_transform, self.num_classes)

    def _loader(self, dataset, batch_size: int, shuffle: bool):
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle,
                                           num_workers=self.num_workers, collate_fn=collate_segmentation,
                                           persistent_workers=self.num_workers > 0)

    def train_dataloader(self):
        return self._loader(self.train_set, min(self.batch_size, len(self.train_set)), True)

    def val_dataloader(self):
        return self._loader(self.val_set, self.val_batch_size, False)

    def test_dataloader(self):
        return self.val_dataloader()


def check_ade20k(root, splits=("train", "val"), *, quick: bool = False, progress=None,
                 num_classes: int | None = None, reader_options=None, progress_every: float = 5.0) -> list[str]:
    """Every problem of an ADE20K-layout folder, one line each naming the file: a split folder
    missing, an image without its annotation PNG, an annotation of another size than its image
    or not single-channel, label values above ``num_classes`` (150), annotations without an
    image, unreadable files. ``quick`` reads only the annotations' headers (sizes), not values."""
    num_classes = ADE20K_NUM_CLASSES if num_classes is None else num_classes
    try:
        base = ade20k_root(root)
    except FileNotFoundError as err:
        return [str(err)]
    problems = []
    for split in splits:
        folder = _split_folder(split)
        try:
            pairs = ade20k_pairs(base, split)
        except FileNotFoundError as err:
            problems.append(str(err))
            continue
        if not pairs:
            problems.append(f"{os.path.join(base, 'images', folder)}: no images")
        ann_dir = os.path.join(base, "annotations", folder)
        if not os.path.isdir(ann_dir):
            problems.append(f"{ann_dir}: no such folder (annotations of split {split!r})")
            continue
        stems = {os.path.splitext(os.path.basename(img))[0] for img, _ in pairs}
        for name in sorted(os.listdir(ann_dir)):
            if name.endswith(".png") and os.path.splitext(name)[0] not in stems:
                problems.append(f"{os.path.join(ann_dir, name)}: annotation without an image")
        for i, (image_path, label_path) in enumerate(pairs):
            if progress is not None and i and i % 500 == 0:
                progress(f"{split}: {i}/{len(pairs)} images checked")
            if not os.path.isfile(label_path):
                problems.append(f"{label_path}: annotation missing (image {image_path})")
                continue
            try:
                with Image.open(image_path) as im:
                    image_size = im.size
                    if not quick:
                        im.load()
                with Image.open(label_path) as lab:
                    if lab.mode not in ("L", "P", "I", "I;16"):
                        problems.append(f"{label_path}: not a single-channel label PNG (mode {lab.mode})")
                        continue
                    if lab.size != image_size:
                        problems.append(f"{label_path}: annotation is {lab.size[0]}x{lab.size[1]}, its image "
                                        f"{image_size[0]}x{image_size[1]}")
                        continue
                    if not quick:
                        top = int(np.array(lab).max(initial=0))
                        if top > num_classes:
                            problems.append(f"{label_path}: label value {top} above {num_classes} classes "
                                            f"(--num-classes N for another dataset in this layout)")
            except (OSError, ValueError) as err:
                problems.append(f"{image_path}: unreadable ({err})")
    return problems
