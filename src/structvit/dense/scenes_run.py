"""A CPU-scale detection run: Mask R-CNN with a tiny backbone on the built-in digit scenes,
StructSA in every attention block beside the all-SA version, results into a page.

    python -m structvit.dense.scenes_run --steps 600 --write docs/results/detection_scenes.md

The scenes are exported in the COCO layout (``structvit.data.scenes.export_scenes``) and read
back by the COCO reader; training and evaluation are the engine's (:class:`DetectionModule`,
COCOeval box and mask AP on the held-out validation scenes, whose digits come from other
handwritten source images than the training scenes'). The CPU scale shrinks the detector's
proposal and RoI counts and its box head (``--representation-size``); the model is otherwise
the configs' Mask R-CNN.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
import time

__all__ = ["VARIANTS", "run_variant", "main"]

#: name -> backbone options: StructSA everywhere, or every attention block plain SA
VARIANTS = {"structsa": {}, "sa": {"struct_blocks": (0, 0)}}
CPU_DETECTOR = dict(rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=150, rpn_pre_nms_top_n_test=300,
                    rpn_post_nms_top_n_test=150, box_batch_size_per_image=64, box_detections_per_img=20)


def _progress_callback():
    import lightning as L

    class Progress(L.Callback):
        """One line on stderr every ``every`` steps: the step, the loss, the minutes so far."""

        def __init__(self, name: str, every: int):
            self.name, self.every, self.t0 = name, every, time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if step % self.every == 0:
                loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
                print(f"{self.name}: step {step}, loss {loss:.3f}, {(time.perf_counter() - self.t0) / 60:.1f} min",
                      file=sys.stderr, flush=True)

    return Progress


def run_variant(root: str, variant: str, *, steps: int, batch_size: int, lr: float, size: int,
                representation_size: int, seed: int, workdir: str, threads: int = 1) -> dict:
    """Train ``variant`` for ``steps`` optimiser steps on the COCO folder ``root`` (0: the
    initialisation, the chance reference), then evaluate."""
    import lightning as L
    import torch

    torch.set_num_threads(threads)
    _Progress = _progress_callback()
    from ..data.coco import CocoDataModule
    from ..engine.detection import DetectionModule

    L.seed_everything(seed, verbose=False)
    dm = CocoDataModule(root, batch_size=batch_size, num_workers=0, flip_prob=0.5)
    module = DetectionModule("structvit_tiny", dm.num_classes, model_kwargs=dict(VARIANTS[variant]),
                             min_size=size, max_size=size, representation_size=representation_size,
                             detector_kwargs=CPU_DETECTOR, lr=lr, weight_decay=0.05,
                             lr_steps=[], warmup_iters=min(100, steps // 5), warmup_ratio=0.001)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0,
                        gradient_clip_val=None, default_root_dir=os.path.join(workdir, variant),
                        enable_model_summary=False, callbacks=[_Progress(variant, every=25)])
    t0 = time.perf_counter()
    if steps > 0:
        trainer.fit(module, dm)
    train_s = time.perf_counter() - t0
    evaluator = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, default_root_dir=os.path.join(workdir, variant))
    metrics = evaluator.validate(module, dm, verbose=False)[0]
    params = sum(p.numel() for p in module.model.parameters())
    out = {"variant": variant, "steps": steps, "batch_size": batch_size, "lr": lr, "params_m": params / 1e6,
           "train_minutes": train_s / 60, "threads": torch.get_num_threads()}
    out.update({k.removeprefix("val/"): float(v) for k, v in metrics.items()})
    return out


def _markdown(rows: list[dict], args, command: str) -> str:
    lines = ["# Detection on the built-in digit scenes (CPU scale)", "",
             f"Written by `{command}`.", "",
             f"Mask R-CNN (torchvision's, FPN with a max-pooled fifth level) over `structvit_tiny`, trained from "
             f"scratch for {args.steps} steps of {args.batch_size} scenes ({args.size} x {args.size} px, 2-5 digits "
             f"each, {args.train} training scenes), AdamW lr {args.lr:g} with linear warm-up, weight decay 0.05, "
             f"horizontal flips; CPU-scale detector: box head width {args.representation_size}, "
             f"{CPU_DETECTOR['rpn_post_nms_top_n_train']} proposals, {CPU_DETECTOR['box_batch_size_per_image']} RoIs "
             f"per image. Evaluated with pycocotools' COCOeval on {args.val} held-out scenes whose digits come from "
             "other handwritten source images; AP in percent (IoU .50:.95), AP50 at IoU 0.5. Chance level is "
             "the untrained detector's row. One seed per variant: the StructSA / SA difference is one draw.", "",
             "| backbone attention | params (M) | box AP | box AP50 | box AP75 | mask AP | mask AP50 | train min |",
             "|---|---|---|---|---|---|---|---|"]
    names = {"structsa": "StructSA (all blocks)", "sa": "SA (struct_blocks=(0, 0))"}
    for r in rows:
        name = names[r["variant"]] + (", untrained (chance)" if r["steps"] == 0 else "")
        lines.append(f"| {name} | {r['params_m']:.2f} | {r['box_ap']:.1f} | {r['box_ap50']:.1f} | "
                     f"{r['box_ap75']:.1f} | {r['mask_ap']:.1f} | {r['mask_ap50']:.1f} | {r['train_minutes']:.1f} |")
    return "\n".join(lines) + "\n"


def _exported_counts(root: str) -> dict | None:
    """Images per split of a COCO export under ``root`` (None: no complete export)."""
    import json

    counts = {}
    for split, name in (("train", "train2017"), ("val", "val2017")):
        path = os.path.join(root, "annotations", f"instances_{name}.json")
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            counts[split] = len(json.load(f)["images"])
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m structvit.dense.scenes_run", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--size", type=int, default=96, help="scene side in pixels")
    p.add_argument("--train", type=int, default=800, help="training scenes")
    p.add_argument("--val", type=int, default=100, help="validation scenes")
    p.add_argument("--representation-size", type=int, default=256)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per variant")
    p.add_argument("--jobs", type=int, default=1, help="variants trained at the same time (processes)")
    p.add_argument("--workdir", default=None, help="where the scenes are exported (default: a temporary folder)")
    p.add_argument("--write", default=None, help="results page (.md; a .csv is written beside it)")
    args = p.parse_args(argv)
    import torch

    from ..data.scenes import export_scenes

    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    workdir = args.workdir or tmp.name
    root = os.path.join(workdir, f"scenes_coco_{args.size}px_seed{args.seed}")
    if _exported_counts(root) != {"train": args.train, "val": args.val}:  # absent or of other counts
        shutil.rmtree(root, ignore_errors=True)
        export_scenes(root, format="coco", counts={"train": args.train, "val": args.val}, size=args.size,
                      seed=args.seed)
    if _exported_counts(root) != {"train": args.train, "val": args.val}:
        raise RuntimeError(f"the scenes under {root} are not the {args.train} / {args.val} requested")
    import concurrent.futures
    import multiprocessing

    common = dict(batch_size=args.batch_size, lr=args.lr, size=args.size, representation_size=args.representation_size,
                  seed=args.seed, workdir=workdir, threads=args.threads)
    jobs = [(v, args.steps) for v in args.variants] + [(args.variants[0], 0)]
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, args.jobs),
                                                mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_variant, root, v, steps=n, **common) for v, n in jobs]
        rows = []
        for (v, n), fut in zip(jobs, futures):
            rows.append(fut.result())
            print(f"{v} ({n} steps): {rows[-1]}", file=sys.stderr, flush=True)
    command = "python -m structvit.dense.scenes_run " + " ".join(argv if argv is not None else sys.argv[1:])
    text = _markdown(rows, args, command.strip())
    print(text)
    if args.write:
        os.makedirs(os.path.dirname(os.path.abspath(args.write)), exist_ok=True)
        with open(args.write, "w") as f:
            f.write(text)
        with open(os.path.splitext(args.write)[0] + ".csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
