"""Load UniFormer (or any SA / StructViT) weights into a StructViT, and image -> video inflation.

The official UniFormer checkpoints (Sense-X/UniFormer) are PyTorch state dicts, usually
wrapped as ``{"model": state_dict}`` (image) or ``{"model_state": state_dict}`` (video),
whose names are StructViT's: ``patch_embed{1..4}``, ``blocks{1..4}.{i}``, ``norm``,
``head``. Converting one to a StructViT of the same size:

- every tensor of the checkpoint goes to the parameter of the same name; shapes must
  match (a mismatch is refused, naming the layer), except that with ``inflate`` a 2-D
  (image) kernel is spread over time to fill a 3-D (video) one;
- every StructSA/ConvSA block, whose ``u_k``/``u_v`` the checkpoint lacks, gets the
  SA-equivalent initialisation (``StructSA.reset_patterns("sa")``), so the converted
  model computes exactly what the SA model did.

Command line: ``structvit convert IN OUT.safetensors --model NAME [--inflate center|average]``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Mapping

import torch
import torch.nn as nn

from .nn.attention import StructSA

__all__ = ["INFLATE_MODES", "ConversionReport", "unwrap_state_dict", "inflate_weight", "inflate_state_dict",
           "load_uniformer", "main"]

INFLATE_MODES = ("center", "average")
_WRAPPER_KEYS = ("model", "model_state", "state_dict", "module")


@dataclasses.dataclass
class ConversionReport:
    """What :func:`load_uniformer` did.

    Attributes:
        loaded: target names filled from the checkpoint.
        inflated: names whose 2-D kernels were spread over time.
        sa_initialised: StructSA modules (by name) given the SA-equivalent patterns.
        missing: target names the checkpoint did not fill (besides the StructSA patterns
            that were SA-initialised), e.g. a new head.
        unexpected: checkpoint names the model has no parameter or buffer for.
    """

    loaded: list[str] = dataclasses.field(default_factory=list)
    inflated: list[str] = dataclasses.field(default_factory=list)
    sa_initialised: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors",
                 f"inflated {len(self.inflated)} 2-D kernels to 3-D" + (f": {', '.join(self.inflated)}" if self.inflated else ""),
                 f"SA-equivalent patterns in {len(self.sa_initialised)} StructSA/ConvSA blocks"
                 + (f": {', '.join(self.sa_initialised)}" if self.sa_initialised else "")]
        lines.append(f"missing keys ({len(self.missing)}): {', '.join(self.missing) or 'none'}")
        lines.append(f"unexpected keys ({len(self.unexpected)}): {', '.join(self.unexpected) or 'none'}")
        return "\n".join(lines)


def unwrap_state_dict(checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: unwraps ``{"model": ...}`` (and ``model_state``,
    ``state_dict``) and strips a DistributedDataParallel ``module.`` prefix."""
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a state dict (a mapping of names to tensors), got {type(checkpoint).__name__}")
    sd = checkpoint
    for _ in range(2):  # at most one level of wrapping, sometimes two
        inner = next((sd[k] for k in _WRAPPER_KEYS if k in sd and isinstance(sd[k], Mapping)), None)
        if inner is None:
            break
        sd = inner
    out = {}
    for name, value in sd.items():
        if not isinstance(value, torch.Tensor):
            continue  # e.g. epoch counters next to the tensors
        out[name[len("module."):] if name.startswith("module.") else name] = value
    if not out:
        raise ValueError("checkpoint holds no tensors (expected a state dict or {'model': state_dict})")
    return out


def inflate_weight(weight: torch.Tensor, time: int, mode: str = "center") -> torch.Tensor:
    """Spread a 2-D kernel (A, B, kh, kw) over ``time`` frames: (A, B, time, kh, kw).

    ``"center"`` puts the 2-D kernel in the middle frame (zeros elsewhere): on a clip of
    identical frames the 3-D convolution equals the 2-D one frame by frame, also at the
    clip's ends. ``"average"`` repeats it divided by ``time`` (the UniFormer / I3D way):
    equal on identical frames away from the temporal padding only.
    """
    if mode not in INFLATE_MODES:
        raise ValueError(f"inflate must be one of {INFLATE_MODES}, got {mode!r}")
    if weight.dim() != 4:
        raise ValueError(f"only 4-D (2-D kernel) weights inflate, got shape {tuple(weight.shape)}")
    if not isinstance(time, int) or time < 1:
        raise ValueError(f"time must be a positive int, got {time!r}")
    if mode == "center":
        out = weight.new_zeros(weight.shape[:2] + (time,) + weight.shape[2:])
        out[:, :, time // 2] = weight
        return out
    return weight.unsqueeze(2).repeat(1, 1, time, 1, 1) / time


def inflate_state_dict(state_dict: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor] | nn.Module,
                       mode: str = "center") -> tuple[dict[str, torch.Tensor], list[str]]:
    """Inflate every 4-D tensor whose target (a state dict or model) is 5-D with the same
    other sizes; returns the new state dict and the inflated names."""
    if mode not in INFLATE_MODES:
        raise ValueError(f"inflate must be one of {INFLATE_MODES}, got {mode!r}")
    shapes = {k: v.shape for k, v in (target.state_dict() if isinstance(target, nn.Module) else target).items()}
    out, inflated = dict(state_dict), []
    for name, w in state_dict.items():
        want = shapes.get(name)
        if (want is not None and w.dim() == 4 and len(want) == 5 and tuple(want[:2]) == tuple(w.shape[:2])
                and tuple(want[3:]) == tuple(w.shape[2:])):
            out[name] = inflate_weight(w, int(want[2]), mode)
            inflated.append(name)
    return out, inflated


def _layer_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def load_uniformer(model: nn.Module, state_dict: Mapping, inflate: str | None = None, strict: bool = True,
                   ignore_head: bool = False) -> ConversionReport:
    """Load a UniFormer (SA) or StructViT state dict into ``model`` (a StructViT of the same size).

    Args:
        model: the target, e.g. ``timm.create_model("structvit_small", struct_blocks="all")``.
        state_dict: the checkpoint; ``{"model": ...}``/``{"model_state": ...}`` wrappers and a
            ``module.`` prefix are accepted.
        inflate: None (shapes must match), or "center"/"average" to spread 2-D (image)
            kernels over time when the model is a video model.
        strict: raise ``KeyError`` on unexpected keys, or on missing keys other than the
            StructSA patterns; with False they are only reported.
        ignore_head: skip the checkpoint's ``head.*`` (e.g. a different number of
            classes); the model's head stays as it is and is reported missing.

    Returns:
        A :class:`ConversionReport`. StructSA/ConvSA modules whose ``u_k``/``u_v`` the
        checkpoint lacks are reset to the SA-equivalent patterns, so the model's outputs
        equal the SA model's (in eval mode, within float tolerance).

    Raises:
        ValueError: a tensor's shape differs from the model's (the message names the layer).
        KeyError: with ``strict``, unexpected or missing keys.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if inflate is not None and inflate not in INFLATE_MODES:
        raise ValueError(f"inflate must be None or one of {INFLATE_MODES}, got {inflate!r}")
    sd = unwrap_state_dict(state_dict)
    if ignore_head:
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    target = model.state_dict()
    report = ConversionReport()
    if inflate is not None:
        sd, report.inflated = inflate_state_dict(sd, target, inflate)
    for name, w in sd.items():
        if name not in target:
            report.unexpected.append(name)
            continue
        if tuple(w.shape) != tuple(target[name].shape):
            hint = ""
            if w.dim() == 4 and target[name].dim() == 5:
                hint = " (a 2-D image kernel into a video model: pass inflate='center' or 'average')"
            elif name.startswith("head."):
                hint = " (a different number of classes: pass ignore_head=True and train a new head)"
            raise ValueError(f"size mismatch in layer {_layer_of(name)!r}: checkpoint {name} has shape "
                             f"{tuple(w.shape)}, the model expects {tuple(target[name].shape)}{hint}")
        report.loaded.append(name)
    pattern_names = set()
    for mname, module in model.named_modules():
        if isinstance(module, StructSA):
            keys = [f"{mname}.u_k", f"{mname}.u_v"]
            if not any(k in sd for k in keys):
                report.sa_initialised.append(mname)
                pattern_names.update(keys)
    # BatchNorm's num_batches_tracked only matters for momentum=None; older checkpoints lack it
    report.missing = [k for k in target if k not in sd and k not in pattern_names
                      and not k.endswith(".num_batches_tracked")]
    if strict and (report.unexpected or report.missing):
        raise KeyError("checkpoint does not match the model (pass strict=False to load anyway):\n"
                       f"missing keys ({len(report.missing)}): {', '.join(report.missing) or 'none'}\n"
                       f"unexpected keys ({len(report.unexpected)}): {', '.join(report.unexpected) or 'none'}")
    with torch.no_grad():
        model.load_state_dict({k: sd[k] for k in report.loaded}, strict=False)
        modules = dict(model.named_modules())
        for mname in report.sa_initialised:
            modules[mname].reset_patterns("sa")
    return report


# --------------------------------------------------------------------------- command line


def _read_checkpoint(path: str, trust: bool = False) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as err:  # pickled non-tensor objects (e.g. training args) need trust
        if trust:
            raise
        raise ValueError(f"cannot read {path} with weights_only=True ({type(err).__name__}); if you trust the "
                         "file, pass --trust-checkpoint to unpickle it fully") from err


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
        description="Convert a UniFormer (SA) or StructViT checkpoint into a StructViT model and save it as "
                    "safetensors. StructSA/ConvSA blocks get the SA-equivalent initialisation, so the "
                    "converted model reproduces the source model.")
    parser.add_argument("input", help="checkpoint (.pth/.pt with a state dict or {'model': ...}, or .safetensors)")
    parser.add_argument("output", help="output .safetensors file")
    parser.add_argument("--model", required=True, help="registered StructViT name, e.g. structvit_small or structvit_b_4_1")
    parser.add_argument("--inflate", choices=INFLATE_MODES, default=None,
                        help="spread 2-D (image) kernels over time for a video model")
    parser.add_argument("--struct-blocks", type=_parse_struct_blocks, default=None,
                        help="override where StructSA goes: 'all' or 'a,b' (0,0 = plain UniFormer)")
    parser.add_argument("--attention", choices=("structsa", "convsa"), default=None)
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

    import timm
    from safetensors.torch import save_file

    from . import models  # noqa: F401  (registers the StructViT names)

    if args.model not in models.MODEL_NAMES:
        parser.error(f"--model must be one of {', '.join(models.MODEL_NAMES)}, got {args.model!r}")
    try:
        sd = unwrap_state_dict(_read_checkpoint(args.input, args.trust_checkpoint))
    except (OSError, TypeError, ValueError) as err:
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
    model = timm.create_model(args.model, **kwargs)
    try:
        report = load_uniformer(model, sd, inflate=args.inflate, strict=not args.non_strict,
                                ignore_head=args.ignore_head)
    except (KeyError, ValueError) as err:
        print(f"structvit convert: {err.args[0] if err.args else err}", file=sys.stderr)
        return 1
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    metadata = {"model": args.model, "source": args.input, "inflate": str(args.inflate),
                **{k: str(v) for k, v in kwargs.items()}}
    save_file(tensors, args.output, metadata=metadata)
    print(report)
    print(f"saved {len(tensors)} tensors of {args.model} to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
