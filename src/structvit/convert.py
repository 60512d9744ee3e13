"""``structvit convert IN OUT.safetensors --model NAME [--inflate center|average]``: load a
UniFormer / DeiT (SA) or StructViT checkpoint into a StructViT or DeiT-style model and save
it as safetensors.

The conversion itself (name mapping, SA-equivalent pattern initialisation, image -> video
inflation, the report of what was exact) is :mod:`structvit.conversion`, whose functions
this module re-exports.
"""
from __future__ import annotations

import argparse
import sys

import torch

from .config import settings
from .conversion import (INFLATE_MODES, ConversionReport, adapt_vit_state_dict, inflate_state_dict, inflate_weight,
                         load_checkpoint, load_deit, load_uniformer, unwrap_state_dict)

__all__ = ["INFLATE_MODES", "ConversionReport", "unwrap_state_dict", "inflate_weight", "inflate_state_dict",
           "load_uniformer", "load_deit", "load_checkpoint", "adapt_vit_state_dict", "main"]


# --------------------------------------------------------------------------- command line


def _read_checkpoint(path: str, trust: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of ``path`` (:func:`structvit.checkpoint.read_checkpoint`; ``trust``:
    unpickle fully, for a trusted release file that pickles training arguments)."""
    from .checkpoint import read_checkpoint

    return read_checkpoint(path, trust=trust).state_dict


def _parse_struct_blocks(text: str):
    if text == "all":
        return "all"
    try:
        a, b = (int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--struct-blocks must be 'all' or 'a,b' (e.g. 4,1), got {text!r}") from None
    return a, b


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="structvit convert",
        description="Convert a UniFormer (SA) or StructViT checkpoint into a StructViT model, or a DeiT / timm ViT "
                    "checkpoint into a StructDeiT model (structvit_deit_*), and save it as safetensors. "
                    "StructSA/ConvSA blocks get the SA-equivalent initialisation, so at key/value stride 1 the "
                    "converted model reproduces the source model; the report says when it does not.")
    parser.add_argument("input", help="checkpoint (.pth/.pt with a state dict or {'model': ...}, or .safetensors)")
    parser.add_argument("output", help="output .safetensors file")
    parser.add_argument("--model", required=True,
                        help="registered name, e.g. structvit_s_4_1, structvit_b_4_1_video or structvit_deit_small")
    parser.add_argument("--inflate", choices=INFLATE_MODES, default=None,
                        help="spread 2-D (image) kernels over time for a video model")
    parser.add_argument("--struct-blocks", type=_parse_struct_blocks, default=None,
                        help="StructViT models: where StructSA goes, 'all' or 'a,b' (0,0 = plain UniFormer)")
    parser.add_argument("--attention", choices=("structsa", "convsa", "sa"), default=None,
                        help="kind of attention ('sa' only for the structvit_deit_* models)")
    parser.add_argument("--class-token", action="store_true",
                        help="structvit_deit_* models: keep a class token (default: none, average pooling)")
    parser.add_argument("--num-frames", type=int, default=None, help="video models: default clip length")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classes of the new model (default: those of the checkpoint's head)")
    parser.add_argument("--ignore-head", action="store_true", help="do not load the checkpoint's classifier")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="unpickle the input fully (torch.load weights_only=False); only for trusted files")
    parser.add_argument("--non-strict", action="store_true", help="report, instead of refusing, missing/unexpected keys")
    args = parser.parse_args(argv)
    if not args.output.endswith(".safetensors"):
        parser.error("OUT must be a .safetensors file")

    import json

    import timm

    from . import models
    from .checkpoint import CheckpointWriteError, write_safetensors

    try:
        models.check_model_name(args.model, "--model")
    except ValueError as err:
        parser.error(str(err))
    if args.model not in models.project_model_names():
        parser.error(f"--model {args.model}: convert builds the StructViT and DeiT-style models "
                     f"({', '.join(models.project_model_names())})")
    is_deit = args.model in models.DEIT_MODEL_NAMES
    if is_deit and args.struct_blocks is not None:
        parser.error("--struct-blocks is for the StructViT models; a structvit_deit_* model has StructSA in every block")
    if not is_deit and (args.attention == "sa" or args.class_token):
        parser.error("--attention sa and --class-token are for the structvit_deit_* models")
    try:
        sd = unwrap_state_dict(_read_checkpoint(args.input, args.trust_checkpoint))
    except (OSError, TypeError, ValueError) as err:
        if settings().traceback:
            raise
        print(f"structvit convert: {err}", file=sys.stderr)
        return 1
    kwargs = {}
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    elif "head.weight" in sd and not args.ignore_head:
        kwargs["num_classes"] = int(sd["head.weight"].shape[0])
    for key in ("struct_blocks", "attention", "num_frames"):
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    if args.class_token:
        kwargs["class_token"] = True
    try:
        model = timm.create_model(args.model, **kwargs)
    except (TypeError, ValueError) as err:
        if settings().traceback:
            raise
        print(f"structvit convert: cannot build {args.model}: {err}", file=sys.stderr)
        return 1
    try:
        from .engine.weights import check_weights

        sd = check_weights(sd, model.state_dict(), args.input)  # finite, of the model's kinds; dtypes cast
        report = load_checkpoint(model, sd, inflate=args.inflate, strict=not args.non_strict,
                                 ignore_head=args.ignore_head)
    except (KeyError, ValueError) as err:
        if settings().traceback:
            raise
        print(f"structvit convert: {err.args[0] if err.args else err}", file=sys.stderr)
        return 1
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    options = {k: v for k, v in kwargs.items() if k != "num_classes"}
    # the options as JSON (what the checkpoint reader takes) and, as before, one key each
    metadata = {"model": args.model, "source": args.input, "inflate": str(args.inflate), "exact": str(report.exact),
                "model_kwargs": json.dumps(options), **{k: str(v) for k, v in kwargs.items()}}
    try:
        write_safetensors(args.output, tensors, metadata)
    except CheckpointWriteError as err:
        if settings().traceback:
            raise
        print(f"structvit convert: {err}", file=sys.stderr)
        return 1
    print(report)
    print(f"saved {len(tensors)} tensors of {args.model} to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
