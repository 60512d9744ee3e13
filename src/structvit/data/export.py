"""Writing the built-in data in benchmark layouts (``structvit data export``)."""
from __future__ import annotations

import json
import os

__all__ = ["export_moving_digits_ssv2", "export_digits_imagefolder", "MOVING_DIGITS_TEMPLATES"]

#: SSv2-style templates of the moving-digits classes (label order = class id)
MOVING_DIGITS_TEMPLATES = (
    "Moving [something] from right to left",
    "Moving [something] from left to right",
    "Moving [something] up",
    "Moving [something] down",
    "Approaching [something] with your camera",
    "Moving away from [something] with your camera",
    "Turning [something] clockwise",
    "Turning [something] anticlockwise",
    "Moving [something] left and then back right",
    "Moving [something] right and then back left",
)


def export_moving_digits_ssv2(out_dir, *, splits=("train", "val"), limit: int | None = None, seed: int = 0,
                              progress=None) -> dict:
    """Write moving digits in the Something-Something V2 layout (lossless VP9 ``.webm``,
    so the SSv2 reader gets back the exact pixels).  Returns ``{split: number of clips}``."""
    from .builtin import load_digit_images, make_moving_digits
    from .something import ssv2_template_to_label
    from .video import write_video

    ldir = os.path.join(out_dir, "labels")
    vdir = os.path.join(out_dir, "20bn-something-something-v2")
    os.makedirs(ldir, exist_ok=True)
    os.makedirs(vdir, exist_ok=True)
    with open(os.path.join(ldir, "something-something-v2-labels.json"), "w") as f:
        json.dump({ssv2_template_to_label(t): str(i) for i, t in enumerate(MOVING_DIGITS_TEMPLATES)}, f, indent=1)
    _, digit_of = load_digit_images()
    counts = {}
    for split in splits:
        clips, labels, src = make_moving_digits(split, seed=seed)
        n = len(labels) if limit is None else min(limit, len(labels))
        base = 1 if split == "train" else 1_000_001
        entries = []
        for i in range(n):
            vid = str(base + i)
            t = MOVING_DIGITS_TEMPLATES[int(labels[i])]
            obj = f"digit {int(digit_of[src[i]])}"
            entries.append({"id": vid, "label": t.replace("[something]", obj), "template": t, "placeholders": [obj]})
            write_video(os.path.join(vdir, vid + ".webm"), clips[i], fps=8, codec="libvpx-vp9", pix_fmt="gbrp",
                        options={"lossless": "1"})
            if progress and i and i % 200 == 0:
                progress(f"{split}: {i}/{n}")
        name = "train" if split == "train" else "validation"
        with open(os.path.join(ldir, f"something-something-v2-{name}.json"), "w") as f:
            json.dump(entries, f)
        counts[split] = n
    return counts


def export_digits_imagefolder(out_dir, *, size: int = 32, splits=("train", "val"), limit: int | None = None) -> dict:
    """Write digits as ImageNet-style class folders of PNGs plus ``classes.txt``."""
    from PIL import Image

    from .builtin import DigitsDataset

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "classes.txt"), "w") as f:
        f.write("\n".join(DigitsDataset.classes) + "\n")
    counts = {}
    for split in splits:
        ds = DigitsDataset(split, size=size)
        n = len(ds) if limit is None else min(limit, len(ds))
        for i in range(n):
            d = os.path.join(out_dir, split, DigitsDataset.classes[int(ds.targets[i])])
            os.makedirs(d, exist_ok=True)
            Image.fromarray(ds.images[i].permute(1, 2, 0).numpy()).save(os.path.join(d, f"{ds.source_index[i]:04d}.png"))
        counts[split] = n
    return counts
