"""``structvit viz``: the paper's figures from a checkpoint or a registered model.

    structvit viz attention --model structvit_tiny --sample builtin:digits:3 --out figs/
    structvit viz kernels   --checkpoint run.ckpt --model structvit_tiny_video --sample builtin:moving_digits:0
    structvit viz kernels   --model structvit_tiny --channel 5    # one channel's kernels (default: the mean)
    structvit viz compare   --model structvit_tiny --input cat.png --block 1 --query 3,4
    structvit viz demo      --out docs/figures      # the committed example figures

Checkpoints: every format :func:`structvit.checkpoint.read_checkpoint` reads (``.safetensors``
from ``structvit fit`` or ``structvit convert``, whose metadata names the model; Lightning
``.ckpt``; plain or wrapped state dicts), weights only, metadata checked; a state dict
may also carry a ``net.`` / ``backbone.`` prefix.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import settings

__all__ = ["main", "load_model", "load_sample", "read_checkpoint"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg")
_PREFIXES = ("", "model.", "module.", "net.", "backbone.", "model.module.")


class ArgumentError(ValueError):
    """A bad command-line argument; the message names it."""


def read_checkpoint(path):
    """The checked :class:`~structvit.checkpoint.Checkpoint` of ``--checkpoint``; an unreadable
    file or bad metadata raises :class:`ArgumentError` naming the file."""
    from ..checkpoint import CheckpointError
    from ..checkpoint import read_checkpoint as read

    try:
        return read(path)
    except FileNotFoundError:
        raise ArgumentError(f"--checkpoint {str(path)!r}: no such file") from None
    except CheckpointError as e:
        raise ArgumentError(f"--checkpoint {e}") from None


def _match_prefix(tensors: dict, target: dict) -> dict:
    best, best_n = tensors, -1
    for p in _PREFIXES:
        cand = {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}
        n = sum(k in target for k in cand)
        if n > best_n:
            best, best_n = cand, n
    return best


def _model_kwargs(text: str | None) -> dict:
    if not text:
        return {}
    try:
        kw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ArgumentError(f"--model-kwargs must be a JSON object, e.g. '{{\"num_classes\": 10}}' ({e})") from None
    if not isinstance(kw, dict):
        raise ArgumentError(f"--model-kwargs must be a JSON object, got {text!r}")
    for k in ("window", "window_v", "kv_stride", "struct_blocks", "depths", "embed_dims"):
        if isinstance(kw.get(k), list):
            kw[k] = tuple(kw[k])
    return kw


def load_model(name: str | None = None, checkpoint=None, model_kwargs: dict | None = None, seed: int = 0):
    """A StructViT in eval mode: ``name`` (registered) built with ``model_kwargs``, with the
    weights of ``checkpoint`` if given (the name may then come from the checkpoint's metadata;
    ``num_classes`` from its head)."""
    import timm

    from .. import models

    kwargs = dict(model_kwargs or {})
    ckpt = None if checkpoint is None else read_checkpoint(checkpoint)
    tensors = None if ckpt is None else ckpt.state_dict
    if name is None:
        name = ckpt.model if ckpt is not None else None
        if name is None:
            raise ArgumentError("--model NAME is required (the checkpoint does not name its model)")
    try:
        name = models.check_model_name(name, "--model")
    except ValueError as e:
        raise ArgumentError(str(e)) from None
    # the checkpoint's recorded options (checked by the reader), under the user's own
    if ckpt is not None and ckpt.model in (None, name):
        for key, val in ckpt.model_kwargs.items():
            kwargs.setdefault(key, val)
    if tensors is not None and "num_classes" not in kwargs:
        head = next((v for k, v in tensors.items() if k.endswith("head.weight") and v.dim() == 2), None)
        if head is not None:
            kwargs["num_classes"] = int(head.shape[0])
    torch.manual_seed(seed)
    try:
        model = timm.create_model(name, **kwargs)
    except (TypeError, ValueError) as e:
        raise ArgumentError(f"--model {name} with --model-kwargs {kwargs}: {e}") from None
    if tensors is not None:
        target = model.state_dict()
        sd = _match_prefix(tensors, target)
        missing = [k for k in target if k not in sd]
        unexpected = [k for k in sd if k not in target]
        bad = [k for k in target if k in sd and sd[k].shape != target[k].shape]
        if missing or bad:
            detail = (f"missing {len(missing)} (e.g. {missing[:3]})" if missing else "") + \
                     (f" shape mismatch {len(bad)} (e.g. {bad[0]}: {tuple(sd[bad[0]].shape)} vs "
                      f"{tuple(target[bad[0]].shape)})" if bad else "")
            raise ArgumentError(f"--checkpoint {str(checkpoint)!r} does not fit --model {name} "
                                f"{kwargs or ''}: {detail.strip()}; pass the kwargs it was trained with "
                                f"via --model-kwargs")
        from ..engine.weights import check_weights

        # finite, of the model's kinds; other float dtypes cast with a warning
        sd = check_weights({k: v for k, v in sd.items() if k in target}, target, str(checkpoint))
        model.load_state_dict(sd)
        if unexpected:
            print(f"structvit viz: ignored {len(unexpected)} checkpoint tensors not in the model "
                  f"(e.g. {unexpected[:3]})", file=sys.stderr)
        # the evaluation preprocessing `structvit fit` recorded (input size, frames, normalisation),
        # so that figures see inputs prepared as the model was evaluated; None: the model's defaults
        model.eval_preprocessing = ckpt.preprocessing
    return model.eval()


def _input_hw(model, size) -> tuple[int, int]:
    """``size``, else the input size the checkpoint was evaluated at, else the model's default."""
    if size:
        return size
    pre = getattr(model, "eval_preprocessing", None)
    if pre and pre.get("input_size"):
        s = pre["input_size"]
        return (s, s) if isinstance(s, int) else tuple(s)
    _, h, w = model.pretrained_cfg.get("input_size", (3, 112, 112))
    return h, w


def _normalise(x: torch.Tensor, model) -> torch.Tensor:
    """(C, [T,] H, W) in [0, 1] -> normalised with the model's mean/std."""
    pre = getattr(model, "eval_preprocessing", None) or {}
    mean = torch.tensor(pre.get("mean") or model.pretrained_cfg.get("mean", (0.485, 0.456, 0.406)), dtype=x.dtype)
    std = torch.tensor(pre.get("std") or model.pretrained_cfg.get("std", (0.229, 0.224, 0.225)), dtype=x.dtype)
    shape = (3,) + (1,) * (x.dim() - 1)
    return (x - mean.view(shape)) / std.view(shape)


def _frames_to_clip(frames: torch.Tensor, model, size, num_frames: int | None) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> normalised (C, T', h, w) at the model's input size."""
    t = frames.shape[0]
    if num_frames is not None and num_frames != t:
        idx = torch.linspace(0, t - 1, num_frames).round().long()
        frames = frames[idx]
    x = frames.permute(3, 0, 1, 2).float() / 255  # (C, T, H, W)
    x = F.interpolate(x, size=_input_hw(model, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return _normalise(x, model)


def load_sample(model, input_path=None, sample: str | None = None, size=None, num_frames: int | None = None):
    """The normalised input of one figure: an image/video file or ``builtin:digits[:I]`` /
    ``builtin:moving_digits[:I]`` (validation split, index I, default 0)."""
    video = bool(getattr(model, "video", False))
    if video and num_frames is None:
        pre = getattr(model, "eval_preprocessing", None) or {}
        num_frames = pre.get("num_frames") or model.pretrained_cfg.get("num_frames", model.num_frames)
    if input_path is not None:
        path = Path(input_path)
        if not path.is_file():
            raise ArgumentError(f"--input {str(path)!r}: no such file")
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            if video:
                raise ArgumentError(f"--input {str(path)!r} is an image but the model is a video model; "
                                    f"pass a video file or --sample builtin:moving_digits")
            from ..data.images import load_image

            img = torch.from_numpy(__import__("numpy").asarray(load_image(path)).copy())
            return _frames_to_clip(img[None], model, size, None)[:, 0]
        if suffix in VIDEO_SUFFIXES:
            if not video:
                raise ArgumentError(f"--input {str(path)!r} is a video but the model is an image model; "
                                    f"pass an image file or --sample builtin:digits")
            from ..data.video import read_video_all

            return _frames_to_clip(read_video_all(str(path)), model, size, num_frames)
        raise ArgumentError(f"--input {str(path)!r}: unknown file type {suffix!r} (images: "
                            f"{', '.join(IMAGE_SUFFIXES)}; videos: {', '.join(VIDEO_SUFFIXES)})")
    spec = sample or ("builtin:moving_digits" if video else "builtin:digits")
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] != "builtin" or parts[1] not in ("digits", "moving_digits"):
        raise ArgumentError(f"--sample must be builtin:digits[:INDEX] or builtin:moving_digits[:INDEX], got {spec!r}")
    try:
        index = int(parts[2]) if len(parts) == 3 else 0
    except ValueError:
        raise ArgumentError(f"--sample index must be an int, got {parts[2]!r}") from None
    if parts[1] == "digits":
        if video:
            raise ArgumentError("--sample builtin:digits is an image but the model is a video model; "
                                "use builtin:moving_digits")
        from ..data.builtin import digits_split, load_digit_images

        images, _ = load_digit_images()
        idx = digits_split("val")
        if not 0 <= index < len(idx):
            raise ArgumentError(f"--sample index must be in [0, {len(idx)}) for builtin:digits, got {index}")
        img = torch.from_numpy(images[idx[index]].copy())  # (8, 8) in [0, 1]
        frames = (img[None, :, :, None].expand(1, 8, 8, 3) * 255).round().to(torch.uint8)
        return _frames_to_clip(frames, model, size, None)[:, 0]
    if not video:
        raise ArgumentError("--sample builtin:moving_digits is a clip but the model is an image model; "
                            "use builtin:digits")
    from ..data.builtin import moving_digits_arrays

    clips, _, _ = moving_digits_arrays("val")
    if not 0 <= index < len(clips):
        raise ArgumentError(f"--sample index must be in [0, {len(clips)}) for builtin:moving_digits, got {index}")
    return _frames_to_clip(clips[index], model, size, num_frames)


def _size(text: str) -> tuple[int, int]:
    try:
        vals = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-size must be 'S' or 'H,W', got {text!r}") from None
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or min(vals) < 16:
        raise argparse.ArgumentTypeError(f"--input-size must be 'S' or 'H,W' with sizes >= 16, got {text!r}")
    return vals


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="structvit viz", description=(
        "The paper's figures (PNG + .npz with the numbers) for a StructViT model. attention: Fig. 2 (D attention "
        "maps of a query, U^K/U^V, dynamic kernels kappa); kernels: Fig. 3 (attention over the space-time key "
        "grid, kappa over its (t,h,w) window); compare: Fig. 4 (SA vs ConvSA vs StructSA); readings: joint vs "
        "per_pattern softmax; demo: one of each for a tiny image and a tiny video model."))
    p.add_argument("figure", choices=("attention", "kernels", "compare", "readings", "demo"))
    src = p.add_argument_group("model")
    src.add_argument("--model", default=None, help="registered name, e.g. structvit_tiny / structvit_tiny_video")
    src.add_argument("--checkpoint", default=None, help=".safetensors or .ckpt/.pt/.pth (read weights-only)")
    src.add_argument("--model-kwargs", default=None, help="JSON kwargs for the model, e.g. '{\"num_classes\": 10}'")
    src.add_argument("--compare-checkpoints", nargs="+", default=None, metavar="LABEL=PATH",
                     help="compare: separately trained models (same --model/--model-kwargs), e.g. "
                          "SA=sa.ckpt ConvSA=conv.ckpt StructSA=struct.ckpt; default: SA/ConvSA derived from the model")
    src.add_argument("--seed", type=int, default=0, help="seed of a randomly initialised model (no checkpoint)")
    inp = p.add_argument_group("input")
    inp.add_argument("--input", default=None, help="image or video file")
    inp.add_argument("--sample", default=None, help="builtin:digits[:INDEX] or builtin:moving_digits[:INDEX] "
                                                     "(default for image / video models, index 0)")
    inp.add_argument("--input-size", type=_size, default=None, help="resize the input to S or H,W "
                                                                     "(default: the model's input size)")
    inp.add_argument("--num-frames", type=int, default=None, help="video: frames sampled from the input")
    sel = p.add_argument_group("what to plot")
    sel.add_argument("--block", type=int, default=None,
                     help="attention block index (0 = first attention block of stage 3); default: the "
                          "StructSA block with the largest token grid")
    sel.add_argument("--query", default=None, help="query position 'h,w' or 't,h,w' on the block's token grid "
                                                   "(default: the centre)")
    sel.add_argument("--head", type=int, default=0, help="attention head (default 0)")
    sel.add_argument("--normalize", choices=("joint", "per_pattern"), default=None,
                     help="read the scores with this softmax (default: the block's own)")
    sel.add_argument("--top-k", type=int, default=4, help="dynamic kernels shown (most attended keys)")
    sel.add_argument("--channel", type=int, default=None,
                     help="attention/kernels: the channel of the head whose patterns and dynamic kernels are "
                          "shown (channel-wise StructSA has one kernel per channel); default: the channel mean")
    p.add_argument("--out", default="figures", help="output directory (default ./figures)")
    return p


def _demo(out: Path, seed: int) -> list[Path]:
    """Tiny random image and video models on built-in samples: one of each figure."""
    from .figures import write_demo_figures

    paths = []
    for name, spec, kw in (("structvit_tiny", "builtin:digits:3", {"num_classes": 10}),
                           ("structvit_tiny_video", "builtin:moving_digits:0", {"num_classes": 10, "num_frames": 8})):
        model = load_model(name, None, kw, seed=seed)
        paths += write_demo_figures(model, load_sample(model, sample=spec), out)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from . import figures

    out = Path(args.out)
    try:
        if args.figure == "demo":
            paths = _demo(out, args.seed)
        else:
            if args.model is None and args.checkpoint is None:
                raise ArgumentError("--model NAME or --checkpoint PATH is required")
            if args.input is not None and args.sample is not None:
                raise ArgumentError("give --input or --sample, not both")
            if args.top_k < 1:
                raise ArgumentError(f"--top-k must be >= 1, got {args.top_k}")
            kwargs = _model_kwargs(args.model_kwargs)
            model = load_model(args.model, args.checkpoint, kwargs, seed=args.seed)
            x = load_sample(model, args.input, args.sample, args.input_size, args.num_frames)
            stem = f"{args.figure}_block{args.block if args.block is not None else 'auto'}"
            common = dict(block=args.block, query=args.query, head=args.head)
            try:
                if args.figure == "attention":
                    paths = [figures.attention_figure(model, x, out / f"{stem}.png", normalize=args.normalize,
                                                      top_k=args.top_k, channel=args.channel, **common)]
                elif args.figure == "kernels":
                    paths = [figures.kernels_figure(model, x, out / f"{stem}.png", normalize=args.normalize,
                                                    top_k=args.top_k, channel=args.channel, **common)]
                elif args.figure == "readings":
                    paths = [figures.readings_figure(model, x, out / f"{stem}.png", **common)]
                else:
                    models = model
                    if args.compare_checkpoints:
                        models = {}
                        for item in args.compare_checkpoints:
                            label, sep, path = item.partition("=")
                            if not sep or not label:
                                raise ArgumentError(f"--compare-checkpoints takes LABEL=PATH items, got {item!r}")
                            models[label] = load_model(args.model, path, kwargs)
                    paths = [figures.compare_figure(models, x, out / f"{stem}.png", **common)]
            except ValueError as e:
                msg = str(e)
                for word in ("query", "block", "head", "channel"):
                    if msg.startswith(word):
                        raise ArgumentError(f"--{msg}") from None
                raise
    except (ArgumentError, ValueError, TypeError) as e:
        if settings().traceback:
            raise
        print(f"structvit viz: error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(f"wrote {p} (+ {p.with_suffix('.npz').name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
