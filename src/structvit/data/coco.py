"""COCO instance detection / segmentation, read as distributed.

Layout (``root``)::

    annotations/instances_train2017.json
    annotations/instances_val2017.json
    train2017/<file_name>.jpg
    val2017/<file_name>.jpg

An item is ``(image, target)``: ``image`` float (3, H, W) in [0, 1] (the detector resizes and
normalises it), ``target`` a dict with ``boxes`` (N, 4) float xyxy in pixels, ``labels`` (N,)
int64 in 1..K (the categories sorted by id; 0 is the background), ``masks`` (N, H, W) uint8,
``image_id`` and ``orig_size`` (H, W).  Crowd regions (``iscrowd=1``) are left out of the
targets (COCO's evaluation ignores detections on them); in training, images without a
non-crowd object are skipped as mmdet does and the image, boxes and masks are flipped
horizontally with probability ``flip_prob``.  Boxes, labels and masks of a prediction map back
to COCO's category ids with :attr:`CocoDetection.label_to_category` for evaluation.

A file that is not COCO (missing keys, an unknown category id, a polygon with an odd number of
coordinates, a bad RLE, a file name leaving the image folder) raises :class:`CocoFormatError`
naming the file and the first problems; :func:`check_coco` lists every problem, missing
images included (``structvit data check --dataset coco``).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Optional

import lightning as L
import numpy as np
import torch

__all__ = ["CocoFormatError", "CocoDetection", "CocoDataModule", "annotation_file", "check_coco",
           "coco_problems", "collate_detection", "load_coco_json", "decode_segmentation"]

_IMAGE_KEYS = ("id", "file_name", "height", "width")
_ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")


class CocoFormatError(ValueError):
    """An annotation file that is not COCO, or is inconsistent; the message names the file."""


def annotation_file(root: str, split: str) -> str:
    """``root/annotations/instances_<split>.json``."""
    return os.path.join(root, "annotations", f"instances_{split}.json")


def _inside(folder: str, name) -> Optional[str]:
    """``folder/name`` if ``name`` is a relative path that stays inside ``folder`` (links
    followed), else None."""
    from .files import OutsideRootError, inside_root

    if not isinstance(name, str) or not name or os.path.isabs(name) or "\x00" in name:
        return None
    try:
        return inside_root(os.path.join(folder, name), folder)
    except OutsideRootError:
        return None


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def _segmentation_problem(seg, height: int, width: int) -> Optional[str]:
    """Why ``seg`` (polygons or RLE) is not a valid COCO segmentation, or None."""
    if isinstance(seg, list):
        for poly in seg:
            if not isinstance(poly, list) or not all(_is_number(v) for v in poly):
                return "a polygon that is not a list of numbers"
            if len(poly) % 2:
                return f"a polygon with an odd number of coordinates ({len(poly)})"
            if len(poly) < 6:
                return f"a polygon with fewer than 3 points ({len(poly)} coordinates)"
        return None
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
            return "an RLE without a [height, width] size"
        if list(size) != [height, width]:
            return f"an RLE of size {size}, the image is {[height, width]}"
        if isinstance(counts, list):
            if not all(isinstance(v, int) and v >= 0 for v in counts) or sum(counts) != height * width:
                return f"a bad RLE (uncompressed counts must be non-negative ints summing to {height * width})"
            return None
        if isinstance(counts, str):
            from pycocotools import mask as mask_utils

            try:
                area = int(mask_utils.area({"size": size, "counts": counts.encode()}))
                decoded = mask_utils.decode({"size": size, "counts": counts.encode()})
            except Exception as err:  # noqa: BLE001 - pycocotools reports bad strings in many ways
                return f"a bad RLE ({type(err).__name__})"
            if decoded.shape[:2] != (height, width) or area > height * width:
                return "a bad RLE (its counts do not cover the image)"
            return None
        return "an RLE whose counts are neither a list nor a string"
    return "a segmentation that is neither polygons nor an RLE"


def coco_problems(data, *, where: str = "annotations") -> list[str]:
    """Every problem of a parsed COCO instances file ``data``, one line each (empty: valid)."""
    if not isinstance(data, dict):
        return [f"{where}: not a COCO annotation file (a JSON object with images, annotations, categories)"]
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        return [f"{where}: not a COCO annotation file (no list {', '.join(repr(k) for k in missing)})"]
    problems = []
    categories = set()
    for c in data["categories"]:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            problems.append(f"{where}: category {c!r} has no int id and str name")
        elif c["id"] in categories:
            problems.append(f"{where}: category id {c['id']} appears twice")
        else:
            categories.add(c["id"])
    images = {}
    for im in data["images"]:
        if not isinstance(im, dict) or any(k not in im for k in _IMAGE_KEYS):
            problems.append(f"{where}: image {str(im)[:80]} lacks one of {', '.join(_IMAGE_KEYS)}")
        elif not all(isinstance(im[k], int) and im[k] > 0 for k in ("height", "width")):
            problems.append(f"{where}: image {im['id']} has no positive int height and width")
        elif im["id"] in images:
            problems.append(f"{where}: image id {im['id']} appears twice")
        else:
            images[im["id"]] = im
    for ann in data["annotations"]:
        if not isinstance(ann, dict) or any(k not in ann for k in _ANNOTATION_KEYS):
            problems.append(f"{where}: annotation {str(ann)[:80]} lacks one of {', '.join(_ANNOTATION_KEYS)}")
            continue
        name = f"{where}: annotation {ann['id']}"
        if ann["category_id"] not in categories:
            problems.append(f"{name}: unknown category id {ann['category_id']!r}")
        image = images.get(ann["image_id"])
        if image is None:
            problems.append(f"{name}: unknown image id {ann['image_id']!r}")
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)) or min(bbox[2:]) < 0:
            problems.append(f"{name}: bbox must be [x, y, width, height] with width, height >= 0, got {bbox!r}")
        if ann.get("iscrowd", 0) not in (0, 1):
            problems.append(f"{name}: iscrowd must be 0 or 1, got {ann['iscrowd']!r}")
        if "segmentation" in ann and image is not None:
            why = _segmentation_problem(ann["segmentation"], image["height"], image["width"])
            if why:
                problems.append(f"{name}: {why}")
    return problems


def load_coco_json(path: str) -> dict:
    """The parsed, checked annotation file ``path``; :class:`CocoFormatError` naming it and its problems."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CocoFormatError(f"{path}: not a COCO annotation file (not JSON: {err})") from None
    problems = coco_problems(data, where=path)
    if problems:
        more = f" (and {len(problems) - 3} more problems; `structvit data check --dataset coco` lists them)"
        raise CocoFormatError("; ".join(problems[:3]) + (more if len(problems) > 3 else ""))
    return data


def decode_segmentation(seg, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as a (height, width) uint8 mask."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width)) if seg else None
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = {"size": seg["size"], "counts": seg["counts"].encode() if isinstance(seg["counts"], str)
               else seg["counts"]}
    if rle is None:
        return np.zeros((height, width), np.uint8)
    return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)


def _coco_api(data: dict):
    from pycocotools.coco import COCO

    api = COCO()
    api.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        api.createIndex()
    return api


class CocoDetection(torch.utils.data.Dataset):
    """One COCO split (see the module docstring).

    Args:
        root: the COCO folder (``annotations/``, ``<split>/``).
        split: ``train2017``, ``val2017`` or any ``instances_<split>.json`` present.
        train: skip images without objects and flip at random.
        flip_prob: probability of a horizontal flip in training.
        masks: decode instance masks (False: boxes only).
    """

    def __init__(self, root: str, split: str = "val2017", *, train: bool = False, flip_prob: float = 0.5,
                 masks: bool = True):
        if not isinstance(root, (str, os.PathLike)) or not os.path.isdir(root):
            raise NotADirectoryError(f"root must be an existing COCO folder, got {root!r}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob!r}")
        self.root, self.split, self.train, self.flip_prob, self.masks = str(root), split, train, flip_prob, masks
        self.image_dir = os.path.join(self.root, split)
        self.annotation_path = annotation_file(self.root, split)
        data = load_coco_json(self.annotation_path)
        self.coco = _coco_api(data)
        self.category_ids = sorted(self.coco.cats)
        self.classes = [self.coco.cats[c]["name"] for c in self.category_ids]
        self.category_to_label = {c: i + 1 for i, c in enumerate(self.category_ids)}
        self.label_to_category = {i + 1: c for i, c in enumerate(self.category_ids)}
        ids = sorted(self.coco.imgs)
        if train:
            ids = [i for i in ids if any(not a.get("iscrowd", 0) for a in self.coco.imgToAnns.get(i, []))]
        self.image_ids = ids
        
    @property
    def num_classes(self) -> int:
        """Object categories (the background not counted)."""
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, image_id: int) -> str:
        name = self.coco.imgs[image_id]["file_name"]
        path = _inside(self.image_dir, name)
        if path is None:
            raise CocoFormatError(f"{self.annotation_path}: image {image_id}: file_name {name!r} leaves {self.image_dir}")
        return path

    def __getitem__(self, index: int):
        from PIL import Image

        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_path(image_id)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{self.annotation_path}: image {image_id}: missing image file {path}")
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"))
        height, width = array.shape[:2]
        if (height, width) != (info["height"], info["width"]):
            raise CocoFormatError(f"{path} is {width}x{height}, its annotation says {info['width']}x{info['height']}")
        image = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                             dtype=torch.float32).reshape(-1, 4)
        boxes[:, 0::2].clamp_(0, width)
        boxes[:, 1::2].clamp_(0, height)
        # degenerate boxes (no area after clipping) break the box regression targets
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        anns = [a for a, k in zip(anns, keep.tolist()) if k]
        target = {"boxes": boxes[keep],
                  "labels": torch.tensor([self.category_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
                  "image_id": int(image_id), "orig_size": (height, width)}
        if self.masks:
            masks = [decode_segmentation(a["segmentation"], height, width) if "segmentation" in a else
                     _box_mask(a["bbox"], height, width) for a in anns]
            target["masks"] = (torch.from_numpy(np.stack(masks)) if masks
                               else torch.zeros((0, height, width), dtype=torch.uint8))
        if self.train and self.flip_prob > 0 and float(torch.rand(())) < self.flip_prob:
            image, target = hflip(image, target)
        return image, target


def _box_mask(bbox, height: int, width: int) -> np.ndarray:
    x, y, w, h = bbox
    m = np.zeros((height, width), np.uint8)
    m[int(y):int(np.ceil(y + h)), int(x):int(np.ceil(x + w))] = 1
    return m


def hflip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    """Flip ``image`` (3, H, W) and its ``boxes`` (N, 4 xyxy) and ``masks`` (N, H, W) left-right."""
    width = image.shape[-1]
    target = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, 0], boxes[:, 2] = width - target["boxes"][:, 2], width - target["boxes"][:, 0]
    target["boxes"] = boxes
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return image.flip(-1), target


def collate_detection(batch: list) -> tuple[list, list]:
    """``(images, targets)`` lists: detection images differ in size (the model batches them)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def check_coco(root: str, splits=("train2017", "val2017"), *, num_classes: Optional[int] = None) -> list[str]:
    """Every problem of the COCO folder ``root`` (the annotation files' and missing or
    unreadable images, each named), one line each; empty when all is well. ``num_classes``:
    the expected number of categories (COCO's 80 when None); ``splits`` None: both."""
    splits = splits or ("train2017", "val2017")
    expected = 80 if num_classes is None else num_classes
    problems = []
    for split in splits:
        path = annotation_file(root, split)
        if not os.path.isfile(path):
            problems.append(f"{path}: missing annotation file")
            continue
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            problems.append(f"{path}: not a COCO annotation file (not JSON: {err})")
            continue
        found = coco_problems(data, where=path)
        problems += found
        if any("not a COCO annotation file" in p for p in found):
            continue
        if not found and len(data["categories"]) != expected:
            problems.append(f"{path}: {len(data['categories'])} categories, expected {expected}"
                            + (" (COCO's; --num-classes for another set)" if num_classes is None else ""))
        image_dir = os.path.join(root, split)
        for im in data["images"]:
            if not isinstance(im, dict) or "file_name" not in im:
                continue
            file = _inside(image_dir, im["file_name"])
            if file is None:
                problems.append(f"{path}: image {im.get('id')}: file_name {im['file_name']!r} leaves {image_dir}")
            elif not os.path.isfile(file):
                problems.append(f"{path}: image {im.get('id')}: missing image file {file}")
            else:
                why = _image_problem(file, im)
                if why:
                    problems.append(f"{file}: {why}")
    return problems


def _image_problem(path: str, info: dict) -> Optional[str]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()
    except Exception as err:  # noqa: BLE001 - any way an image can be unreadable
        return f"unreadable image ({type(err).__name__})"
    if size != (info.get("width"), info.get("height")):
        return f"image is {size[0]}x{size[1]}, its annotation says {info.get('width')}x{info.get('height')}"
    return None


class CocoDataModule(L.LightningDataModule):
    """COCO train / val (/ test) loaders of ``(images, targets)`` lists.

    Args:
        root: the COCO folder (see :mod:`structvit.data.coco`).
        train_split, val_split: annotation names (``instances_<split>.json``).
        test_split: the split of ``structvit test`` (default: ``val_split``).
        batch_size: images per step (the paper: 16 over 8 GPUs, i.e. 2 per GPU).
        num_workers: loader processes.
        flip_prob: horizontal flip probability in training.
    """

    def __init__(self, root: str, train_split: str = "train2017", val_split: str = "val2017",
                 test_split: Optional[str] = None, batch_size: int = 2, num_workers: int = 2,
                 flip_prob: float = 0.5, pin_memory: bool = False):
        super().__init__()
        if not isinstance(root, str) or not os.path.isdir(root):
            raise NotADirectoryError(f"data.root must be an existing COCO folder, got {root!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob!r}")
        self.save_hyperparameters()
        self._datasets: dict = {}
        # the categories (and so num_classes) come from the validation file: it is the smaller one
        self._categories = sorted((c["id"], c["name"]) for c in self.dataset("val").coco.cats.values())

    @property
    def num_classes(self) -> int:
        """Object categories (the background not counted)."""
        return len(self._categories)

    @property
    def classes(self) -> list[str]:
        return [name for _, name in self._categories]

    def dataset(self, stage: str) -> CocoDetection:
        """The dataset of ``stage`` (``train``, ``val`` or ``test``), read once."""
        hp = self.hparams
        split = {"train": hp.train_split, "val": hp.val_split, "test": hp.test_split or hp.val_split}[stage]
        if stage not in self._datasets:
            ds = CocoDetection(hp.root, split, train=stage == "train", flip_prob=hp.flip_prob)
            if self._datasets and stage == "train":
                val = self._datasets.get("val")
                if val is not None and ds.category_ids != val.category_ids:
                    raise CocoFormatError(f"{ds.annotation_path} and {val.annotation_path} list different categories")
            self._datasets[stage] = ds
        return self._datasets[stage]

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit"):
            self.dataset("train")
            self.dataset("val")
        elif stage == "validate":
            self.dataset("val")
        elif stage in ("test", "predict"):
            self.dataset("test")

    def _loader(self, stage: str, shuffle: bool):
        hp = self.hparams
        return torch.utils.data.DataLoader(
            self.dataset(stage), batch_size=hp.batch_size, shuffle=shuffle, num_workers=hp.num_workers,
            collate_fn=collate_detection, pin_memory=hp.pin_memory, persistent_workers=hp.num_workers > 0)

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("val", False)

    def test_dataloader(self):
        return self._loader("test", False)

    def predict_dataloader(self):
        return self._loader("test", False)
