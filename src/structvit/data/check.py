"""``structvit data``: check a dataset, export the built-in data, benchmark decoding.

    structvit data check --dataset ssv2 --root DIR [--split train val] [--quick]
    structvit data export moving_digits --format ssv2 DIR [--limit N] [--seed S]
    structvit data export digits --format imagefolder DIR
    structvit data export scenes --format coco|ade20k DIR [--limit N] [--seed S]
    structvit data bench-decode [--seconds 10] [--height 320] [--frames 16] [--stride 4]

``check`` lists every problem without training, and exits with status 1 if there is any:
annotation rows with unknown labels or missing files, labels that appear in only one of
the checked splits (a misspelled label in the train CSV becomes a class of its own), a
class count other than the benchmark's (400 Kinetics, 174 SSv1/v2, 48 Diving-48, 99/288
FineGym, 1000 ImageNet; ``--num-classes`` for another label set), and unreadable or
truncated videos and frames: by default every frame of every sample is decoded (with
progress on stderr); ``--quick`` decodes only the first, middle and last frame.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from .decode_bench import bench_decode
from .export import MOVING_DIGITS_TEMPLATES, export_digits_imagefolder, export_moving_digits_ssv2
from .scan import DATASET_CHECKS, check_dataset, dataset_check

__all__ = ["main", "check_dataset", "export_moving_digits_ssv2", "export_digits_imagefolder", "bench_decode",
           "MOVING_DIGITS_TEMPLATES"]


def _log(msg, out=None):
    print(msg, file=out if out is not None else sys.stdout, flush=True)



# --------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="structvit data", description="dataset tools")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="scan a dataset and list every problem, without training")
    c.add_argument("--dataset", required=True,
                   help=", ".join(DATASET_CHECKS))
    c.add_argument("--root", required=False, help="dataset folder (official layout)")
    c.add_argument("--split", nargs="+", default=None,
                   help="splits to check (default: the dataset's, train val for the classification benchmarks)")
    c.add_argument("--quick", action="store_true",
                   help="decode the first, middle and last frame of each video (every 50th image) instead of all")
    c.add_argument("--num-classes", type=int, default=None,
                   help="the expected class count (default: the benchmark's, e.g. 400 for Kinetics)")
    c.add_argument("--max-print", type=int, default=200, help="problems printed in full (default 200)")
    e = sub.add_parser("export", help="write built-in data in a benchmark layout")
    e.add_argument("name", choices=["moving_digits", "digits", "scenes"])
    e.add_argument("out", help="output folder")
    e.add_argument("--format", required=True, choices=["ssv2", "imagefolder", "coco", "ade20k"],
                   help="ssv2 (moving_digits), imagefolder (digits), coco or ade20k (scenes)")
    e.add_argument("--split", nargs="+", default=["train", "val"])
    e.add_argument("--limit", type=int, default=None, help="at most this many samples per split (scenes: this many, default 400 train, 100 val)")
    e.add_argument("--seed", type=int, default=0, help="moving_digits and scenes generation seed")
    b = sub.add_parser("bench-decode", help="decoding throughput: seeking to a clip vs decoding the whole video")
    b.add_argument("--seconds", type=float, default=10)
    b.add_argument("--height", type=int, default=320)
    b.add_argument("--gop", type=int, default=60)
    b.add_argument("--frames", type=int, default=16)
    b.add_argument("--stride", type=int, default=4)
    b.add_argument("--repeats", type=int, default=10)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check":
        from .readers import canonical_name

        name = canonical_name(args.dataset)
        if name not in DATASET_CHECKS:
            _log(f"structvit data check: unknown dataset {args.dataset!r}; "
                 f"choose from {', '.join(DATASET_CHECKS)}", sys.stderr)
            return 2
        if DATASET_CHECKS[name] is not None and (not args.root or not os.path.isdir(args.root)):
            _log(f"structvit data check: --root must be an existing folder, got {args.root!r}", sys.stderr)
            return 2
        t0 = time.perf_counter()
        try:
            check = dataset_check(name)
        except ValueError as e:
            _log(f"structvit data check: {e}", sys.stderr)
            return 2
        problems = check_dataset(name, args.root, args.split, quick=args.quick, num_classes=args.num_classes,
                                 progress=lambda m: _log(f"  ... {m}", sys.stderr)) if check is not None else []
        for line in problems[: args.max_print]:
            _log(f"PROBLEM {line}")
        if len(problems) > args.max_print:
            _log(f"... and {len(problems) - args.max_print} more")
        status = "no problems" if not problems else f"{len(problems)} problem(s)"
        splits = ", ".join(args.split) if args.split else "default splits"
        _log(f"{name} ({splits}) under {args.root}: {status} [{time.perf_counter() - t0:.1f} s]")
        return 1 if problems else 0
    if args.command == "export":
        formats = {"moving_digits": ("ssv2",), "digits": ("imagefolder",), "scenes": ("coco", "ade20k")}[args.name]
        if args.format not in formats:
            _log(f"structvit data export: {args.name} can be exported as {' or '.join(formats)}, not {args.format}",
                 sys.stderr)
            return 2
        if args.name == "scenes":
            from .scenes import export_scenes

            default = {"train": 400, "val": 100}
            try:
                counts = export_scenes(args.out, format=args.format, seed=args.seed,
                                       counts={s: args.limit or default.get(s, 100) for s in args.split})
            except ValueError as e:
                _log(f"structvit data export: {e}", sys.stderr)
                return 2
        elif args.name == "moving_digits":
            counts = export_moving_digits_ssv2(args.out, splits=args.split, limit=args.limit, seed=args.seed,
                                               progress=lambda m: _log(f"  ... {m}", sys.stderr))
        else:
            counts = export_digits_imagefolder(args.out, splits=args.split, limit=args.limit)
        _log(f"wrote {args.name} as {args.format} to {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        return 0
    if args.command == "bench-decode":
        r = bench_decode(seconds=args.seconds, height=args.height, gop=args.gop, frames=args.frames,
                         stride=args.stride, repeats=args.repeats)
        _log(f"video: {r['video']}; clip: {r['clip']}")
        _log(f"seeking reader : {r['seek_clips_per_s']:.1f} clips/s ({r['frames_decoded_per_clip']:.0f} of "
             f"{r['frames_in_video']} frames decoded per clip)")
        _log(f"whole video    : {r['full_decode_videos_per_s']:.2f} videos/s")
        _log(f"speed-up       : {r['speedup']:.1f}x")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())

