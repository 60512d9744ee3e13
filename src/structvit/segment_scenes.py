"""``structvit segment-scenes``: a CPU-scale Semantic FPN run on the built-in digit scenes.

Exports the digit scenes (:mod:`structvit.data.scenes`) in the ADE20K layout, so the real
ADE20K reader and pipeline are what is trained on, then trains Semantic FPN
(:class:`structvit.engine.segmentation.SegmentationModule`) over a tiny backbone twice, with
StructSA in every attention block and with plain SA (``struct_blocks=(0, 0)``), the same
seed, data and schedule, and writes the validation mIoU / mAcc / pixel accuracy of both next
to the chance levels (every pixel background, the most frequent class) to a Markdown page:

    structvit segment-scenes --write docs/results/segmentation_scenes.md
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

__all__ = ["run", "main"]


def _chance(dm) -> dict[str, float]:
    """Metrics of predicting the most frequent validation label everywhere."""
    from .engine.segmentation import confusion_matrix, segmentation_metrics

    k = dm.num_classes
    counts = torch.zeros(k, dtype=torch.int64)
    labels = [item["label"] for item in dm.val_set]
    for label in labels:
        valid = label[label != 255]
        counts += torch.bincount(valid.flatten(), minlength=k)[:k]
    majority = int(counts.argmax())
    conf = sum(confusion_matrix(torch.full_like(lab, majority), lab, k) for lab in labels)
    return dict(segmentation_metrics(conf), majority=majority)


def run(root: str, *, model: str = "structvit_tiny", steps: int = 300, batch_size: int = 8, crop: int = 64,
        lr: float = 1e-3, seed: int = 0, variants=(("StructSA", {}), ("SA", {"struct_blocks": (0, 0)})),
        progress=None) -> tuple[list[dict], dict]:
    """Train and validate each variant on the ADE20K-layout folder ``root``; returns (rows, chance)."""
    import lightning as L

    from .data.ade20k import ADE20KDataModule, read_class_names
    from .engine.segmentation import SegmentationModule

    num_classes = len(read_class_names(root, 11))
    rows = []
    chance = None
    for name, kwargs in variants:
        L.seed_everything(seed, workers=True, verbose=False)
        dm = ADE20KDataModule(root, num_classes=num_classes, batch_size=batch_size, crop_size=crop,
                              scale=(2 * crop, crop), test_scale=(2 * crop, crop), num_workers=0, seed=seed)
        module = SegmentationModule(model, num_classes, model_kwargs=dict(kwargs), lr=lr, weight_decay=1e-4,
                                    max_iters=steps, warmup_iters=max(1, steps // 20), inference="whole")
        trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                            deterministic=False)
        start = time.perf_counter()
        trainer.fit(module, dm)
        train_s = time.perf_counter() - start
        metrics = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).validate(
            module, dm, verbose=False)[0]
        if chance is None:
            chance = _chance(dm)
        params = sum(p.numel() for p in module.model.parameters())
        rows.append(dict(variant=name, kwargs=dict(kwargs), params=params, train_s=train_s,
                         miou=metrics["val/miou"], macc=metrics["val/macc"], aacc=metrics["val/aacc"]))
        if progress is not None:
            progress(f"{name}: mIoU {metrics['val/miou']:.1f}, pixel acc {metrics['val/aacc']:.1f} "
                     f"({train_s:.0f} s training)")
    return rows, chance


def _machine() -> str:
    from .ops.cpuinfo import cpu_model, logical_cpus

    return f"{cpu_model()} ({logical_cpus()} logical CPUs, {torch.get_num_threads()} torch threads)"


def markdown(rows, chance, *, command: str, counts: dict, size: int, model: str, steps: int, batch_size: int,
             crop: int, lr: float, seed: int) -> str:
    lines = [
        "# Semantic segmentation on the built-in digit scenes (CPU scale)",
        "",
        f"Written by `{command}` on {_machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        f"Data: {counts['train']} train and {counts['val']} validation digit scenes of {size} x {size} pixels "
        "(`structvit.data.scenes`, exported in the ADE20K layout and read by the ADE20K reader; train and "
        "validation scenes never share a handwritten digit), 11 classes (background, digits 0-9). "
        f"Model: Semantic FPN over `{model}` (FPN 256, head 128, BatchNorm), trained from scratch for "
        f"{steps} steps of {batch_size} crops of {crop} x {crop} (the ADE20K training pipeline scaled down), "
        f"AdamW lr {lr}, weight decay 1e-4, cosine with linear warm-up; seed {seed}; one run each. "
        "Evaluation: whole image, mIoU over the classes present, pixel accuracy.",
        "",
        "| attention | params (M) | mIoU | mAcc | pixel acc | training time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['params'] / 1e6:.2f} | {r['miou']:.1f} | {r['macc']:.1f} "
                     f"| {r['aacc']:.1f} | {r['train_s']:.0f} |")
    lines.append(f"| chance (every pixel class {chance['majority']}: background) | | {chance['miou']:.1f} "
                 f"| {chance['macc']:.1f} | {chance['aacc']:.1f} | |")
    lines += ["", "Against chance: " + "; ".join(
        f"{r['variant']} mIoU {r['miou']:.1f} vs {chance['miou']:.1f}, mAcc {r['macc']:.1f} vs {chance['macc']:.1f}"
        for r in rows) + ". One seed per row on a shared 2-core CPU: the gap between the two attention kinds "
        "is one run's, not a measured difference."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="structvit segment-scenes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", metavar="PATH", default=None, help="write the results page to PATH")
    parser.add_argument("--root", default=None, help="an ADE20K-layout folder to use (default: export the scenes "
                                                     "into a temporary folder)")
    parser.add_argument("--train", type=int, default=400, help="train scenes to export")
    parser.add_argument("--val", type=int, default=100, help="validation scenes to export")
    parser.add_argument("--size", type=int, default=64, help="scene side in pixels")
    parser.add_argument("--model", default="structvit_tiny", help="backbone (a registered name)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("train", "val", "size", "steps", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive int, got {getattr(args, name)}")
    from .data.scenes import export_scenes

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            root = os.path.join(tmp, "scenes_ade20k")
            export_scenes(root, format="ade20k", counts={"train": args.train, "val": args.val}, size=args.size)
        rows, chance = run(root, model=args.model, steps=args.steps, batch_size=args.batch_size, crop=args.size,
                           lr=args.lr, seed=args.seed, progress=progress)
    command = "structvit segment-scenes" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    text = markdown(rows, chance, command=command, counts={"train": args.train, "val": args.val}, size=args.size,
                    model=args.model, steps=args.steps, batch_size=args.batch_size, crop=args.size, lr=args.lr,
                    seed=args.seed)
    print(text, end="")
    if args.write:
        from pathlib import Path

        from .checkpoint import atomic_write

        with atomic_write(args.write) as tmp_path:
            Path(tmp_path).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
