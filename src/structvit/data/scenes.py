"""Built-in dense-prediction data: scenes of several real digits on a cluttered canvas.

Each scene is a ``size`` x ``size`` RGB image holding 2-5 of the sklearn 8x8 handwritten
digits (upscaled to 18-40 px, in random colours, later digits occluding earlier ones) over a
background of smooth colour noise, strokes and dim fragments of other digits (clutter that
is not an object).  Every digit is an instance (class = the digit, 0-9) with a tight box and a
mask of its visible pixels; the per-pixel classes follow from the masks.  Scenes of the
``train`` split draw their digits from the train source images of ``digits``, ``val`` scenes
from its validation images, so the two never share a handwritten digit.  Everything is
deterministic given ``seed``.

``export_scenes(out, format="coco" | "ade20k")`` writes them in the real benchmarks' layouts,
so the COCO and ADE20K readers are what the demo and the tests read:

- COCO: ``annotations/instances_{train2017,val2017}.json`` (categories 1-10 named "0"-"9",
  compressed RLE masks, since digits such as 0, 6, 8 have holes), ``train2017/``,
  ``val2017/`` PNG images;
- ADE20K: ``images/{training,validation}/ADE_{train,val}_%08d.png`` and
  ``annotations/{training,validation}/`` PNGs of per-pixel labels: 1 = background,
  2 + d = digit d (0 stays unused: ADE20K's "ignore"), so 11 classes; ``classes.txt`` names them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .builtin import digits_split, load_digit_images

__all__ = ["Scene", "SCENE_CLASSES", "ADE20K_SCENE_CLASSES", "make_scene", "make_scenes", "export_scenes",
           "EXPORT_SPLITS"]

#: instance classes (COCO category d + 1 is digit d)
SCENE_CLASSES = tuple(str(d) for d in range(10))
#: per-pixel classes of the ADE20K export: label 1 + i is ADE20K_SCENE_CLASSES[i]; 0 is ignore
ADE20K_SCENE_CLASSES = ("background",) + tuple(f"digit {d}" for d in range(10))
#: export split names: built-in split -> (COCO, ADE20K)
EXPORT_SPLITS = {"train": ("train2017", "training"), "val": ("val2017", "validation")}
#: mask threshold on the upscaled digit intensity (in [0, 1])
INK_THRESHOLD = 0.35


@dataclass
class Scene:
    """image (H, W, 3) uint8; masks (N, H, W) bool (visible pixels); labels (N,) digits 0-9;
    boxes (N, 4) float xyxy, tight around each mask (pixel edges)."""

    image: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray

    def semantic(self) -> np.ndarray:
        """(H, W) uint8 per-pixel classes: 1 background, 2 + d digit d."""
        out = np.ones(self.image.shape[:2], np.uint8)
        for mask, label in zip(self.masks, self.labels):
            out[mask] = 2 + int(label)
        return out


def _upscale(digit: np.ndarray, side: int) -> np.ndarray:
    t = torch.from_numpy(np.array(digit, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(side, side), mode="bilinear", align_corners=False)[0, 0].numpy()


def _background(rng: np.random.Generator, size: int, fragments: np.ndarray) -> np.ndarray:
    """Smooth colour noise, a few strokes and dim digit fragments: (size, size, 3) float in [0, 1]."""
    coarse = rng.uniform(0.0, 0.45, size=(1, 3, 4, 4)).astype(np.float32)
    img = F.interpolate(torch.from_numpy(coarse), size=(size, size), mode="bicubic",
                        align_corners=False)[0].permute(1, 2, 0).numpy()
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(rng.integers(2, 6)):  # strokes: thin lines of random colour
        x0, y0, x1, y1 = rng.uniform(0, size, 4)
        length = max(np.hypot(x1 - x0, y1 - y0), 1.0)
        dist = np.abs((y1 - y0) * xx - (x1 - x0) * yy + x1 * y0 - y1 * x0) / length
        t = ((xx - x0) * (x1 - x0) + (yy - y0) * (y1 - y0)) / length ** 2
        on = (dist < rng.uniform(0.6, 1.5)) & (t >= 0) & (t <= 1)
        img[on] = 0.5 * img[on] + 0.5 * rng.uniform(0.2, 0.7, 3)
    for frag in fragments:  # dim fragments: a quarter to a half of another digit
        side = int(rng.integers(10, 22))
        d = _upscale(frag, side)
        keep = slice(0, int(side * rng.uniform(0.4, 0.6)))
        d = d[keep] if rng.random() < 0.5 else d[:, keep]
        h, w = d.shape
        y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        a = 0.45 * d[..., None]
        img[y:y + h, x:x + w] = (1 - a) * img[y:y + h, x:x + w] + a * rng.uniform(0.3, 0.8, 3)
    return img


def make_scene(rng: np.random.Generator, sources: np.ndarray, *, size: int = 128, min_digits: int = 2,
               max_digits: int = 5, min_side: int | None = None, max_side: int | None = None,
               min_visible: int = 30) -> Scene:
    """One scene whose digits (and clutter fragments) are drawn from the source indices ``sources``."""
    images, targets = load_digit_images()
    min_side = min_side or max(12, round(size * 0.14))
    max_side = max_side or max(min_side + 1, round(size * 0.31))
    img = _background(rng, size, images[rng.choice(sources, 3)])
    owner = np.full((size, size), -1, np.int64)  # which instance a pixel shows (-1: background)
    placed: list[tuple[int, int, int, int]] = []
    labels = []
    for _digit in range(int(rng.integers(min_digits, max_digits + 1))):
        for _ in range(20):  # place without covering more than a third of an earlier digit's box
            side = int(rng.integers(min_side, max_side + 1))
            y, x = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
            if all(_overlap((x, y, x + side, y + side), b) < 1 / 3 for b in placed):
                break
        else:
            continue
        src = int(rng.choice(sources))
        ink = _upscale(images[src], side)
        on = ink > INK_THRESHOLD
        colour = rng.uniform(0.55, 1.0, 3) * (rng.random(3) < 0.8) + 0.1
        region = img[y:y + side, x:x + side]
        alpha = np.clip(ink * 1.6, 0, 1)[..., None]
        region[:] = (1 - alpha) * region + alpha * np.clip(colour, 0, 1)
        owner[y:y + side, x:x + side][on] = len(labels)
        placed.append((x, y, x + side, y + side))
        labels.append(int(targets[src]))
    masks, kept, boxes = [], [], []
    for i, label in enumerate(labels):
        m = owner == i
        if m.sum() < min_visible:  # mostly hidden: not an object any more
            continue
        ys, xs = np.nonzero(m)
        masks.append(m)
        kept.append(label)
        boxes.append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
    noise = rng.normal(0, 0.03, img.shape)
    image = (np.clip(img + noise, 0, 1) * 255).round().astype(np.uint8)
    return Scene(image, np.array(masks, bool).reshape(-1, size, size), np.array(kept, np.int64),
                 np.array(boxes, np.float32).reshape(-1, 4))


def _overlap(a, b) -> float:
    """Intersection over the area of ``b`` (boxes xyxy)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0) / ((b[2] - b[0]) * (b[3] - b[1]))


def make_scenes(split: str = "train", count: int = 200, *, seed: int = 0, size: int = 128, **kwargs):
    """``count`` scenes of ``split`` (``train`` / ``val``: disjoint source digits), deterministic in ``seed``."""
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}")
    if not isinstance(size, int) or size < 48:
        raise ValueError(f"size must be an int >= 48 (pixels), got {size!r}")
    sources = digits_split(split)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    for _ in range(count):
        yield make_scene(rng, sources, size=size, **kwargs)


def export_scenes(out_dir: str, *, format: str = "coco", counts: dict | None = None, seed: int = 0,
                  size: int = 128) -> dict:
    """Write scenes as COCO or ADE20K (see the module docstring) into ``out_dir``.

    ``counts``: scenes per split (default ``{"train": 400, "val": 100}``). Returns ``{split: scenes}``."""
    from PIL import Image

    if format not in ("coco", "ade20k"):
        raise ValueError(f"format must be 'coco' or 'ade20k', got {format!r}")
    counts = dict(counts or {"train": 400, "val": 100})
    unknown = set(counts) - set(EXPORT_SPLITS)
    if unknown:
        raise ValueError(f"counts must name the splits train / val, got {sorted(unknown)}")
    for split, n in counts.items():
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"counts[{split!r}] must be a positive int, got {n!r}")
    for split, n in counts.items():
        coco_split, ade_split = EXPORT_SPLITS[split]
        if format == "coco":
            _export_coco_split(out_dir, coco_split, make_scenes(split, n, seed=seed, size=size))
        else:
            prefix = "ADE_train" if split == "train" else "ADE_val"
            img_dir = os.path.join(out_dir, "images", ade_split)
            ann_dir = os.path.join(out_dir, "annotations", ade_split)
            os.makedirs(img_dir, exist_ok=True)
            os.makedirs(ann_dir, exist_ok=True)
            for i, scene in enumerate(make_scenes(split, n, seed=seed, size=size), start=1):
                Image.fromarray(scene.image).save(os.path.join(img_dir, f"{prefix}_{i:08d}.png"))
                Image.fromarray(scene.semantic()).save(os.path.join(ann_dir, f"{prefix}_{i:08d}.png"))
    if format == "ade20k":
        with open(os.path.join(out_dir, "classes.txt"), "w") as f:
            f.write("\n".join(ADE20K_SCENE_CLASSES) + "\n")
    return counts


def _export_coco_split(out_dir: str, split: str, scenes) -> None:
    from PIL import Image
    from pycocotools import mask as mask_utils

    img_dir = os.path.join(out_dir, split)
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    images, annotations = [], []
    for image_id, scene in enumerate(scenes, start=1):
        name = f"{image_id:012d}.png"
        Image.fromarray(scene.image).save(os.path.join(img_dir, name))
        h, w = scene.image.shape[:2]
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        for mask, label, box in zip(scene.masks, scene.labels, scene.boxes):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            x0, y0, x1, y1 = (float(v) for v in box)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label) + 1,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(mask.sum()), "iscrowd": 0,
                                "segmentation": {"size": [h, w], "counts": rle["counts"].decode()}})
    data = {"info": {"description": "StructViT built-in digit scenes"}, "images": images,
            "annotations": annotations,
            "categories": [{"id": d + 1, "name": name, "supercategory": "digit"} for d, name in enumerate(SCENE_CLASSES)]}
    with open(os.path.join(out_dir, "annotations", f"instances_{split}.json"), "w") as f:
        json.dump(data, f)
