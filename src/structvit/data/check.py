"""``structvit data``: check a dataset, export the built-in data, benchmark decoding.

    structvit data check --dataset ssv2 --root DIR [--split train val] [--quick]
    structvit data export moving_digits --format ssv2 DIR [--limit N] [--seed S]
    structvit data export digits --format imagefolder DIR
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
import json
import os
import sys
import time

__all__ = ["main", "check_dataset", "export_moving_digits_ssv2", "export_digits_imagefolder", "bench_decode",
           "MOVING_DIGITS_TEMPLATES"]

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


def _log(msg, out=None):
    print(msg, file=out if out is not None else sys.stdout, flush=True)


# --------------------------------------------------------------------------- check
def check_dataset(dataset: str, root, splits=("train", "val"), *, quick: bool = False,
                  reader_options: dict | None = None, progress=None, num_classes: int | None = None,
                  progress_every: float = 5.0) -> list[str]:
    """Every problem of ``dataset`` under ``root``, as lines naming the file (empty: all good).

    Reads the official annotation files (unknown labels, malformed rows, missing files),
    compares the label sets of the splits and the class count with the benchmark's
    (``num_classes`` overrides it), then decodes every frame of every video or frame folder
    (``quick``: the first, middle and last frame).  ``progress(message)`` is called about
    every ``progress_every`` seconds."""
    from .datasets import BENCHMARK_CLASSES, ImageFolderDataset, canonical_name, read_annotations
    from .video import DataFileError, list_frame_files, probe_video, read_frame_folder, read_video_all, read_video_frames

    name = canonical_name(dataset)
    problems: list[str] = []
    if name in ("digits", "moving_digits"):
        return problems  # built in: generated, nothing on disk
    expected = num_classes if num_classes is not None else BENCHMARK_CLASSES.get("imagenet" if name in (
        "imagenet", "imagefolder") else name)
    if name == "imagefolder" and num_classes is None:
        expected = None  # any folder of classes
    last = [time.perf_counter()]

    def tick(split, i, n):
        if progress and time.perf_counter() - last[0] >= progress_every:
            last[0] = time.perf_counter()
            progress(f"{split}: {i}/{n} samples decoded ({100 * i / max(n, 1):.0f}%)")

    labels_by_split: dict[str, set] = {}
    classes = None
    if name in ("imagenet", "imagefolder"):
        from PIL import Image

        for split in splits:
            try:
                ds = ImageFolderDataset(root, split)
            except (FileNotFoundError, ValueError, ImportError) as e:
                problems.append(f"{split}: {e}")
                continue
            classes = ds.classes
            problems += ds.problems
            labels_by_split[split] = {t for t in ds.targets if t >= 0}
            for i, (path, _) in enumerate(ds.samples):
                tick(split, i, len(ds.samples))
                if quick and i % 50:
                    continue  # --quick: every 50th image
                try:
                    with Image.open(path) as im:
                        im.convert("RGB")
                except Exception as e:
                    problems.append(f"{path}: unreadable image ({type(e).__name__}: {e})")
    else:
        for split in splits:
            try:
                ann = read_annotations(name, root, split, **(reader_options or {}))
            except (FileNotFoundError, ValueError) as e:
                problems.append(f"{split}: {e}")
                continue
            classes = ann.classes
            problems += ann.problems
            if ann.labelled:
                labels_by_split[split] = {r.label for r in ann.records}
            for i, rec in enumerate(ann.records):
                tick(split, i, len(ann.records))
                try:
                    if rec.frames:
                        files = list_frame_files(rec.path)
                        n = len(files)
                        read_frame_folder(rec.path, sorted({0, n // 2, n - 1}) if quick else range(n), files=files)
                    else:
                        n = probe_video(rec.path).num_frames
                        if quick:
                            read_video_frames(rec.path, sorted({0, n // 2, max(n - 1, 0)}))
                        else:
                            decoded = len(read_video_all(rec.path))
                            if decoded + 2 < n:  # header counts may overstate by a frame or two
                                problems.append(f"{rec.path}: {decoded} frames decoded, the header says {n} "
                                                "(truncated or damaged)")
                    if rec.end_frame is not None and rec.end_frame > n + 1:
                        problems.append(f"{rec.path}: annotation says end_frame {rec.end_frame} but it has {n} frames")
                except DataFileError as e:
                    problems.append(str(e))
    if classes is not None and expected is not None and len(classes) != expected:
        problems.append(f"{root}: {len(classes)} classes, the {name} benchmark has {expected} (a misspelled or "
                        f"extra label in the train annotations? --num-classes {len(classes)} if intended)")
    if classes is not None and len(labels_by_split) > 1:
        every = set.union(*labels_by_split.values())
        for label in sorted(every):
            present = [s for s, labs in labels_by_split.items() if label in labs]
            if len(present) == 1:
                problems.append(f"{root}: label {classes[label]!r} appears only in the {present[0]} split")
    return problems


# --------------------------------------------------------------------------- export
def export_moving_digits_ssv2(out_dir, *, splits=("train", "val"), limit: int | None = None, seed: int = 0,
                              progress=None) -> dict:
    """Write moving digits in the Something-Something V2 layout (lossless VP9 ``.webm``,
    so the SSv2 reader gets back the exact pixels).  Returns ``{split: number of clips}``."""
    from .builtin import load_digit_images, make_moving_digits
    from .datasets import ssv2_template_to_label
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


# --------------------------------------------------------------------------- benchmark
def bench_decode(*, seconds: float = 10, height: int = 320, fps: int = 30, gop: int = 60, frames: int = 16,
                 stride: int = 4, repeats: int = 10, workdir=None) -> dict:
    """Clips/s reading a ``frames``-frame clip (seeking) vs decoding the whole video."""
    import tempfile

    import numpy as np

    from .sampling import dense_indices
    from .video import read_video_all, read_video_frames, write_video

    width = int(round(height * 16 / 9 / 2)) * 2
    n = int(seconds * fps)
    tmp = tempfile.TemporaryDirectory(dir=workdir)
    path = os.path.join(tmp.name, "bench.mp4")
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    video = np.stack([np.roll(base, 3 * i, axis=1) for i in range(n)])
    write_video(path, video, fps=fps, gop=gop)
    del video
    r = np.random.default_rng(1)
    t0 = time.perf_counter()
    decoded = 0
    for _ in range(repeats):
        stats = {}
        read_video_frames(path, dense_indices(n, frames, stride, train=True, rng=r)[0], stats=stats)
        decoded += stats["decoded"]
    seek = repeats / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    full_reps = max(1, repeats // 5)
    for _ in range(full_reps):
        read_video_all(path)
    full = full_reps / (time.perf_counter() - t0)
    tmp.cleanup()
    return {"video": f"{seconds:g} s, {width}x{height}, {fps} fps, GOP {gop} (H.264)", "clip": f"{frames} frames, stride {stride}",
            "seek_clips_per_s": seek, "full_decode_videos_per_s": full, "speedup": seek / full,
            "frames_decoded_per_clip": decoded / repeats, "frames_in_video": n}


# --------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="structvit data", description="dataset tools")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="scan a dataset and list every problem, without training")
    c.add_argument("--dataset", required=True,
                   help="kinetics400, ssv2, ssv1, diving48, gym99, gym288, imagenet/imagefolder, digits, moving_digits")
    c.add_argument("--root", required=False, help="dataset folder (official layout)")
    c.add_argument("--split", nargs="+", default=["train", "val"], help="splits to check (default: train val)")
    c.add_argument("--quick", action="store_true",
                   help="decode the first, middle and last frame of each video (every 50th image) instead of all")
    c.add_argument("--num-classes", type=int, default=None,
                   help="the expected class count (default: the benchmark's, e.g. 400 for Kinetics)")
    c.add_argument("--max-print", type=int, default=200, help="problems printed in full (default 200)")
    e = sub.add_parser("export", help="write built-in data in a benchmark layout")
    e.add_argument("name", choices=["moving_digits", "digits"])
    e.add_argument("out", help="output folder")
    e.add_argument("--format", required=True, choices=["ssv2", "imagefolder"],
                   help="ssv2 (moving_digits) or imagefolder (digits)")
    e.add_argument("--split", nargs="+", default=["train", "val"])
    e.add_argument("--limit", type=int, default=None, help="at most this many samples per split")
    e.add_argument("--seed", type=int, default=0, help="moving_digits generation seed")
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
        from .datamodule import IMAGE_DATASETS, VIDEO_DATASETS
        from .datasets import canonical_name

        name = canonical_name(args.dataset)
        if name not in VIDEO_DATASETS + IMAGE_DATASETS:
            _log(f"structvit data check: unknown dataset {args.dataset!r}; "
                 f"choose from {', '.join(VIDEO_DATASETS + IMAGE_DATASETS)}", sys.stderr)
            return 2
        if name not in ("digits", "moving_digits") and (not args.root or not os.path.isdir(args.root)):
            _log(f"structvit data check: --root must be an existing folder, got {args.root!r}", sys.stderr)
            return 2
        t0 = time.perf_counter()
        problems = check_dataset(name, args.root, args.split, quick=args.quick, num_classes=args.num_classes,
                                 progress=lambda m: _log(f"  ... {m}", sys.stderr))
        for line in problems[: args.max_print]:
            _log(f"PROBLEM {line}")
        if len(problems) > args.max_print:
            _log(f"... and {len(problems) - args.max_print} more")
        status = "no problems" if not problems else f"{len(problems)} problem(s)"
        _log(f"{name} ({', '.join(args.split)}) under {args.root}: {status} [{time.perf_counter() - t0:.1f} s]")
        return 1 if problems else 0
    if args.command == "export":
        if (args.name, args.format) not in (("moving_digits", "ssv2"), ("digits", "imagefolder")):
            _log(f"structvit data export: {args.name} can be exported as "
                 f"{'ssv2' if args.name == 'moving_digits' else 'imagefolder'}, not {args.format}", sys.stderr)
            return 2
        if args.name == "moving_digits":
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
