"""``structvit predict``: classify video files, frame folders and images with a trained checkpoint.

    structvit predict clip.webm frames_dir/ --checkpoint runs/x/checkpoints/best.safetensors
    structvit predict a.mp4 b.mp4 --checkpoint best.ckpt --topk 3 --views 4x3 --format json
    structvit predict --config configs/ssv2_structvit_s_4_1.yaml --ckpt_path best   # a whole split

With paths (or ``--checkpoint``), the files are read and prepared exactly as the test split
was at evaluation: the frame count, sampling, frame stride, test views (clips x crops),
short side, crop size and normalisation come from the checkpoint's metadata, which the
engine writes into every ``.ckpt`` and ``.safetensors`` it saves (``preprocessing``, with
the class names).  The scores of a sample's views are averaged as in testing.  Without
paths the command is the LightningCLI ``predict`` over a data module (``--config``), which
writes ``predictions.csv`` with file ids and class names.

The same as one Python call (:mod:`structvit.inference`, re-exported here)::

    from structvit.predict import predict
    rows = predict(["clip.webm"], "best.safetensors", topk=5)
    rows[0]["topk"][0]   # {"index": 3, "name": "Moving something up", "prob": 0.91}
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from typing import Sequence

from .config import settings
from .inference import PredictError, Predictor, load_checkpoint, parse_views, predict

__all__ = ["Predictor", "predict", "load_checkpoint", "is_file_predict", "main", "parse_views", "PredictError"]


def is_file_predict(argv: Sequence[str]) -> bool:
    """True for ``structvit predict PATH ...`` / ``--checkpoint`` (files), False for the
    LightningCLI form (``--config``, ``--ckpt_path``, ...)."""
    argv = list(argv)
    if any(a == "--checkpoint" or a.startswith("--checkpoint=") for a in argv):
        return True
    return bool(argv) and not argv[0].startswith("-")


# --------------------------------------------------------------------------- output
def format_table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        if r["error"]:
            out.append(f"{r['path']}: ERROR {r['error']}")
            continue
        out.append(f"{r['path']} ({r['kind']}, {r['views']} view{'s' if r['views'] != 1 else ''})")
        for rank, t in enumerate(r["topk"], start=1):
            out.append(f"  {rank}. {t['prob']:7.4f}  {t['name']} ({t['index']})")
    return "\n".join(out)


def format_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "kind", "views", "pred", "pred_name", "prob", "topk", "topk_names", "topk_prob", "error"])
    for r in rows:
        t = r["topk"]
        w.writerow([r["path"], r["kind"] or "", r["views"], t[0]["index"] if t else "", t[0]["name"] if t else "",
                    f"{t[0]['prob']:.6f}" if t else "", " ".join(str(e["index"]) for e in t),
                    "|".join(e["name"] for e in t), " ".join(f"{e['prob']:.6f}" for e in t), r["error"] or ""])
    return buf.getvalue()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="structvit predict",
        description="classify video files, frame folders and images with a checkpoint of `structvit fit` "
                    "(preprocessed as at evaluation, from the checkpoint's metadata). Without paths: "
                    "`structvit predict --config CONFIG --ckpt_path best` predicts the data module's test split "
                    "(LightningCLI; see `structvit predict --config CONFIG --help`).")
    p.add_argument("paths", nargs="+", metavar="PATH", help="video files, frame folders or images")
    p.add_argument("--checkpoint", required=True, help="a .safetensors export or .ckpt of `structvit fit`")
    p.add_argument("--topk", type=int, default=5, help="classes listed per file (default 5)")
    p.add_argument("--views", default=None, help="CLIPSxCROPS test views, e.g. 4x3 (default: the checkpoint's)")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table", help="output format")
    p.add_argument("--output", default=None, help="write to this file instead of stdout")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not is_file_predict(argv) and not any(a in ("-h", "--help") for a in argv[:1]):
        from .engine.cli import main as lightning_main

        return lightning_main(argv, "predict")
    from .dense.predict import handles as is_dense_checkpoint, main as predict_dense

    if is_dense_checkpoint(argv):  # a detection checkpoint: boxes, masks and overlays per image
        return predict_dense(argv)
    args = _parser().parse_args(argv)
    try:
        rows = predict(args.paths, args.checkpoint, topk=args.topk, views=args.views, device=args.device)
    except PredictError as err:
        if settings().traceback:
            raise
        print(f"structvit predict: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as err:
        if settings().traceback:
            raise
        print(f"structvit predict: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    text = {"table": format_table, "csv": format_csv,
            "json": lambda r: json.dumps(r, indent=1)}[args.format](rows)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text if text.endswith("\n") else text + "\n")
        print(f"predictions of {len(rows)} file(s) written to {args.output}", file=sys.stderr)
    else:
        print(text)
    bad = [r for r in rows if r["error"]]
    for r in bad:
        if args.format != "table" or args.output:
            print(f"structvit predict: {r['error']}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
