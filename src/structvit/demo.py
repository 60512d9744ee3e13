"""``structvit demo``: train and evaluate small StructViTs on the built-in data, nothing downloaded.

1. digits (sklearn's 1,797 real 8x8 handwritten digits, upscaled to 32x32): a tiny image
   StructViT with StructSA in every attention block;
2. moving digits (clips whose class is a motion, not the digit): a tiny video StructViT;
3. the paper's figures (attention maps per pattern, dynamic kernels, SA/ConvSA/StructSA
   side by side) of the trained video model.

Both runs use the engine of ``structvit fit`` (the same module, callbacks, checkpoints and
logs) and print a short report: validation accuracy, wall time, where checkpoints, logs
and figures went. ``--op`` runs the former op tour instead (SA vs ConvSA vs StructSA on a
grid: the SA-equivalent initialisation reproduces SA; all exact forms agree).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

# The settings of the demo (its report prints the accuracy they reach). ``max_seconds`` caps
# each training run so that the whole demo stays within 5 minutes on a slow 2-core machine;
# the report says how many steps were done.
DIGITS = dict(model="structvit_tiny",
              model_kwargs=dict(struct_blocks="all", attention="structsa", num_patterns=4),
              lr=2e-3, weight_decay=0.05, warmup_steps=20, min_lr=1e-5, label_smoothing=0.1, ema_decay=0.99,
              batch_size=64, max_steps=300, max_seconds=60)
MOVING = dict(model="structvit_tiny_video",
              model_kwargs=dict(num_frames=8, struct_blocks="all", attention="structsa", num_patterns=4,
                                embed_dims=(24, 48, 96, 192), head_dim=24, drop_path_rate=0.1),
              lr=2e-3, weight_decay=0.05, warmup_steps=20, min_lr=1e-5, label_smoothing=0.1, ema_decay=0.99,
              batch_size=32, max_steps=1000, max_seconds=180)


def _train(name: str, cfg: dict, out: Path, *, video: bool, max_steps: int | None, seed: int,
           val_every: int | None, val_batches: int | None = None) -> dict:
    import lightning as L

    from .data import ImageDataModule, VideoDataModule
    from .engine import ClassificationModule, DeterministicData, StructViTCheckpoint, Throughput
    from .engine.cli import default_loggers

    L.seed_everything(seed, workers=True, verbose=False)
    steps = int(max_steps if max_steps is not None else cfg["max_steps"])
    if video:
        dm = VideoDataModule("moving_digits", num_frames=cfg["model_kwargs"]["num_frames"],
                             batch_size=cfg["batch_size"], **cfg.get("data", {}))
    else:
        dm = ImageDataModule("digits", batch_size=cfg["batch_size"])
    hp = {k: v for k, v in cfg.items() if k not in ("batch_size", "max_steps", "max_seconds", "data")}
    module = ClassificationModule(num_classes=dm.num_classes, **hp)
    root = out / name
    last = StructViTCheckpoint(dirpath=str(root / "checkpoints"), filename="step{step}", save_last=True,
                               save_top_k=0, every_n_train_steps=max(1, steps // 2), auto_insert_metric_name=False)
    best = StructViTCheckpoint(dirpath=str(root / "checkpoints"), filename="best", monitor="val/acc1", mode="max",
                               save_top_k=1, auto_insert_metric_name=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, default_root_dir=str(root),
                        logger=default_loggers(str(root)), callbacks=[DeterministicData(), Throughput(), last, best],
                        gradient_clip_val=1.0, log_every_n_steps=10, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        val_check_interval=min(val_every or steps, steps), check_val_every_n_epoch=None,
                        max_time={"seconds": cfg["max_seconds"]} if max_steps is None else None,
                        limit_val_batches=val_batches)
    t0 = time.perf_counter()
    trainer.fit(module, dm)  # validates every `val_every` steps and after the last one
    train_s = time.perf_counter() - t0
    if trainer.global_step < steps:  # stopped by the time budget: evaluate the final weights
        trainer.validate(module, dm, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    samples = dm.val_dataloader().dataset
    n_val = len(samples) if val_batches is None else min(len(samples), val_batches * cfg["batch_size"])
    return {"name": name, "module": module, "datamodule": dm, "trainer": trainer, "metrics": metrics,
            "seconds": time.perf_counter() - t0, "train_seconds": train_s, "steps": trainer.global_step,
            "checkpoints": root / "checkpoints", "logs": Path(trainer.log_dir), "val_size": n_val}


def _report_line(r: dict) -> str:
    m = r["metrics"]
    ema = f", EMA {100 * m['val/ema_acc1']:.1f}%" if "val/ema_acc1" in m else ""
    return (f"{r['name']:<14} val top-1 {100 * m['val/acc1']:5.1f}%{ema} on {r['val_size']} held-out samples; "
            f"{r['steps']} steps in {r['train_seconds']:.0f} s")


def run(out="runs/demo", *, digits_steps: int | None = None, video_steps: int | None = None, seed: int = 0,
        figures: bool = True, video: bool = True, val_every: int | None = None,
        val_batches: int | None = None, threads: int | None = 1) -> dict:
    """Train on digits (and moving digits), evaluate, write figures; returns the results.

    ``threads``: intra-op CPU threads. One by default: these models are too small to gain
    from more, and OpenMP threads that spin-wait make a step 10-30x slower as soon as
    anything else runs on the machine (measured on 2 cores).
    """
    import warnings

    if threads:
        torch.set_num_threads(int(threads))
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*is smaller than the logging interval.*")
    warnings.filterwarnings("ignore", ".*Checkpoint directory .* exists and is not empty.*")
    out = Path(out)
    t0 = time.perf_counter()
    print(f"StructViT demo: training on built-in data (CPU, {torch.get_num_threads()} threads); output in {out}/",
          flush=True)
    results = {}
    print("1. digits: tiny image StructViT, StructSA in every attention block ...", flush=True)
    results["digits"] = _train("digits", DIGITS, out, video=False, max_steps=digits_steps, seed=seed,
                               val_every=val_every, val_batches=val_batches)
    print("   " + _report_line(results["digits"]), flush=True)
    if video:
        print("2. moving digits: tiny video StructViT, the class is the motion ...", flush=True)
        results["moving_digits"] = _train("moving_digits", MOVING, out, video=True, max_steps=video_steps,
                                          seed=seed, val_every=val_every, val_batches=val_batches)
        print("   " + _report_line(results["moving_digits"]), flush=True)
    fig_paths, fig_error = [], None
    if figures:
        print("3. figures of the trained model (attention per pattern, dynamic kernels, SA/ConvSA/StructSA) ...",
              flush=True)
        r = results.get("moving_digits", results["digits"])
        try:
            from .viz import write_demo_figures

            model = r["module"].model.eval()
            sample, _ = r["datamodule"].val_dataloader().dataset[0]
            fig_paths = [Path(p) for p in write_demo_figures(model, sample, out / "figures")]
        except Exception as err:  # noqa: BLE001 - the training results stand; the failure is reported
            fig_error = f"{type(err).__name__}: {err}"
    total = time.perf_counter() - t0
    print("\nStructViT demo report")
    for r in results.values():
        print("  " + _report_line(r))
    for r in results.values():
        print(f"  {r['name']:<14} checkpoints {r['checkpoints']}/ (last.ckpt, best.ckpt, *.safetensors)")
        print(f"  {'':<14} logs        {r['logs']}/ (TensorBoard events, metrics.csv, hparams)")
    if figures:
        if fig_error:
            print(f"  figures: FAILED ({fig_error})")
        else:
            print(f"  figures     {out / 'figures'}/ ({', '.join(p.name for p in fig_paths)})")
    print(f"  total time  {total:.0f} s")
    return {"results": results, "figures": fig_paths, "figure_error": fig_error, "seconds": total}


def _op_tour(argv) -> int:
    from .ops import struct_attention
    from .nn import ConvSA, SelfAttention, StructSA

    p = argparse.ArgumentParser(prog="structvit demo --op")
    p.add_argument("--grid", type=int, nargs="+", default=[4, 8, 8])
    p.add_argument("--patterns", type=int, default=4, help="D (the paper's default: 4)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    grid = tuple(args.grid)
    n, dim, heads = torch.Size(grid).numel(), 32, 2
    window = (3,) * len(grid)
    sa = SelfAttention(dim, heads).double()
    sa_init = StructSA(dim, heads, window=window, num_patterns=args.patterns, init="sa").double()
    rand = StructSA(dim, heads, window=window, num_patterns=args.patterns).double()
    conv = ConvSA(dim, heads, window=window).double()
    for layer in (sa_init, rand, conv):
        layer.load_state_dict(sa.state_dict(), strict=False)
    sa_init.reset_patterns("sa")
    x = torch.randn(2, n, dim, dtype=torch.float64)
    y = sa(x, grid)
    print(f"op tour on a {'x'.join(map(str, grid))} grid, D={args.patterns}: max |y - y_SA|")
    d_init = (sa_init(x, grid) - y).abs().max().item()
    for name, layer in (("StructSA (init='sa')", sa_init), ("StructSA (random)", rand), ("ConvSA", conv)):
        print(f"  {name:<22} {(layer(x, grid) - y).abs().max().item():.2e}")
    # every exact form against the naive one: channel-wise patterns (the paper's) at stride 1
    # and 2 (naive, keyconv), the per-head dot-product variant (also correlation)
    q, k, v = rand._qkv(x)
    head = StructSA(dim, heads, window=window, num_patterns=args.patterns, patterns="head").double()
    agree = 0.0
    for label, u_k, u_v, stride, backends in (
            ("channel-wise", rand.u_k, rand.u_v, 1, ("keyconv",)),
            ("channel-wise, kv_stride 2", rand.u_k, rand.u_v, 2, ("keyconv",)),
            ("per-head", head.u_k, head.u_v, 1, ("correlation", "keyconv"))):
        ref = struct_attention(q, k, v, u_k, u_v, grid, kv_stride=stride, backend="naive")
        diff = max((struct_attention(q, k, v, u_k, u_v, grid, kv_stride=stride, backend=b) - ref).abs().max().item()
                   for b in backends)
        print(f"  {label + ':':<26} {', '.join(backends)} vs naive {diff:.2e}")
        agree = max(agree, diff)
    ok = d_init < 1e-10 and agree < 1e-10
    print("op tour " + ("OK" if ok else "FAILED"))
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--op" in argv:
        argv.remove("--op")
        return _op_tour(argv)
    p = argparse.ArgumentParser(prog="structvit demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--digits-steps", type=int, default=None, help=f"training steps on digits ({DIGITS['max_steps']})")
    p.add_argument("--video-steps", type=int, default=None,
                   help=f"training steps on moving digits ({MOVING['max_steps']})")
    p.add_argument("--no-video", action="store_true", help="digits only")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1; 0: torch's default)")
    p.add_argument("--op", action="store_true", help="the op tour instead (SA vs ConvSA vs StructSA on a grid)")
    args = p.parse_args(argv)
    res = run(args.out, digits_steps=args.digits_steps, video_steps=args.video_steps, seed=args.seed,
              figures=not args.no_figures, video=not args.no_video, threads=args.threads)
    return 1 if res["figure_error"] else 0


if __name__ == "__main__":
    sys.exit(main())
