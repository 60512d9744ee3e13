"""The command line of the benchmarks: ``python -m structvit.bench op|model|autotune``."""
from __future__ import annotations

import argparse
import sys

import torch

from .common import machine_line
from .model import PRECISIONS
from .op import BACKENDS, OP_CASES, peak_main, run_op

# where --write without a path writes, by sub-command and device type
RESULTS = {("op", "cpu"): "docs/results/performance.md", ("op", "cuda"): "docs/results/performance-gpu.md",
           ("model", "cpu"): "docs/results/performance-model.md",
           ("model", "cuda"): "docs/results/performance-gpu-model.md"}


def run_autotune(forget: bool = False, all_machines: bool = False) -> int:
    """Show (default) or delete (``forget``) the choices "auto" recorded on this machine."""
    import json

    from ..ops import autotune

    print(f"# machine: {machine_line(torch.device('cpu'))}")
    path = autotune.cache_file()
    if forget:
        removed = autotune.forget(all_machines=all_machines)
        print("\n".join(f"deleted {p}" for p in removed) or f"nothing recorded ({path} does not exist)")
        return 0
    entries = autotune._read_file(path)
    print(f"# {len(entries)} recorded choices in {path}")
    if entries:
        data = json.loads(path.read_text())["choices"]
        print("| shape class | backend | seconds per candidate | noisy |\n|---|---|---|---|")
        for key, entry in sorted(data.items()):
            secs = ", ".join(f"{name} {t * 1e3:.1f} ms" for name, t in sorted(entry.get("seconds", {}).items()))
            noisy = f"yes ({entry.get('tries', 1)} tries)" if entry.get("noisy") else "no"
            print(f"| {key} | {entry.get('backend')} | {secs} | {noisy} |")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __doc__ as doc

    p = argparse.ArgumentParser(prog="structvit bench", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def write_help(command: str) -> str:
        where = ", ".join(f"{device}: {path}" for (c, device), path in RESULTS.items() if c == command)
        return f"also write the tables to PATH with command, machine and date (without PATH: {where})"

    op = sub.add_parser("op", help="StructSA backends vs SA, fwd+bwd time and peak memory")
    op.add_argument("--cases", nargs="+", default=None, choices=sorted(OP_CASES),
                    help="default: the paper's channel-wise cases (image/video, D=4/8, stride 1/2); on CUDA at GPU "
                         "batch sizes (the gpu_* cases: 128 images, 16 clips)")
    op.add_argument("--backends", nargs="+", default=None, choices=BACKENDS,
                    help="default: naive correlation keyconv fused auto auto-mem (CUDA: keyconv keyconv-torch auto "
                         "sa-keys). auto-mem: auto with --memory-limit; keyconv-torch: keyconv with PyTorch's "
                         "convolutions instead of its kernels; sa-keys: SDPA over D * N' keys (the floor)")
    op.add_argument("--profile", type=int, default=0, metavar="TOP",
                    help="also profile one fwd+bwd of every row and list its TOP operators by self CPU time (CPU)")
    op.add_argument("--memory-limit", type=float, default=8.0,
                    help="working-memory limit in MiB given to auto for the auto-mem row (default 8)")
    op.add_argument("--normalize", default="joint", choices=["joint", "per_pattern"])
    op.add_argument("--device", default="cpu")
    op.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    op.add_argument("--repeats", type=int, default=5)
    op.add_argument("--stat", default="median", choices=["median", "min"],
                    help="per backend: the median or the minimum over the interleaved rounds (min: the least "
                         "disturbed run, for a loaded machine)")
    op.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    op.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    op.add_argument("--write", nargs="?", const="", default=None, metavar="PATH",
                    help=write_help("op"))
    model = sub.add_parser("model", help="training-step time vs all-SA, and inference throughput of registered models")
    model.add_argument("--what", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    model.add_argument("--models", nargs="+", default=None, help="registered names (default: the paper's StructViT-S "
                       "models for train, all for infer; on CUDA for train also structvit_s_8_1, structvit_deit_small)")
    model.add_argument("--image-batch", type=int, default=None, help="default: CPU 4; CUDA 64 (DeiT-style: 128)")
    model.add_argument("--video-batch", type=int, default=None, help="default: CPU 1; CUDA 8")
    model.add_argument("--backend", default="auto", help="StructSA backend of the models")
    model.add_argument("--device", default="cpu")
    model.add_argument("--precision", default=None, choices=PRECISIONS,
                       help="32 (default on the CPU) or bf16-mixed (bf16 autocast; default on CUDA)")
    model.add_argument("--repeats", type=int, default=3)
    model.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    model.add_argument("--write", nargs="?", const="", default=None, metavar="PATH",
                       help=write_help("model"))
    tune = sub.add_parser("autotune", help="the backend choices 'auto' measured and recorded on this machine")
    tune.add_argument("--forget", action="store_true", help="delete them, so that 'auto' measures again")
    tune.add_argument("--all", action="store_true", help="with --forget: the records of every machine key "
                      "(other thread counts, kernel builds, torch versions), not only the current one")
    return p


def _write_path(args, what: str) -> str | None:
    if args.write is None:
        return None
    return args.write or RESULTS[(what, "cuda" if torch.device(args.device).type == "cuda" else "cpu")]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_peak"]:  # internal: one peak-memory measurement (see op.peak_memory_in_subprocess)
        return peak_main(*argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "op":
        run_op(cases=args.cases, backends=args.backends, device=args.device, dtype=args.dtype, repeats=args.repeats,
               stat=args.stat, normalize=args.normalize, memory_limit_mib=args.memory_limit,
               measure_memory=not args.no_memory, profile_top=args.profile, threads=args.threads,
               write=_write_path(args, "op"), argv=argv)
        return 0
    if args.command == "model":
        from .model import run_model

        precision = args.precision or ("bf16-mixed" if torch.device(args.device).type == "cuda" else "32")
        from ..models import check_model_name

        for name in args.models or ():  # a bad name is the user's argument: one line, not a traceback
            try:
                check_model_name(name, "--models")
            except ValueError as err:
                build_parser().error(str(err))
        run_model(what=args.what, models=args.models, image_batch=args.image_batch,
                  video_batch=args.video_batch, backend=args.backend, device=args.device, repeats=args.repeats,
                  threads=args.threads, precision=precision, write=_write_path(args, "model"), argv=argv)
        return 0
    return run_autotune(forget=args.forget, all_machines=args.all)
