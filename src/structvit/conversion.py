"""Load UniFormer / DeiT (SA) weights into StructViT / StructDeiT models, and image -> video inflation.

The official UniFormer checkpoints (Sense-X/UniFormer) are PyTorch state dicts, usually
wrapped as ``{"model": state_dict}`` (image) or ``{"model_state": state_dict}`` (video),
whose names are StructViT's: ``patch_embed{1..4}``, ``blocks{1..4}.{i}``, ``norm``,
``head``. Converting one to a StructViT of the same size:

- every tensor of the checkpoint goes to the parameter of the same name; shapes must
  match (a mismatch is refused, naming the layer), except that with ``inflate`` a 2-D
  (image) kernel is spread over time to fill a 3-D (video) one;
- every StructSA/ConvSA block, whose ``u_k``/``u_v`` the checkpoint lacks, gets the
  SA-equivalent initialisation (``StructSA.reset_patterns("sa")``), so the converted
  model computes exactly what the SA model did -- at key/value stride 1. With a stride
  (the StructViT-X-D-2 models) StructSA sees fewer keys than SA: the conversion is then
  an initialisation only, and the report says so (``report.exact`` is False, with the
  reasons in ``report.inexact``, also logged as a warning).

DeiT / timm ``VisionTransformer`` checkpoints (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
``norm``, ``head``) load into the StructDeiT models (:func:`load_deit`), whose names are
the same; the class token and position embedding are adapted to the target (see there).

The command ``structvit convert IN OUT.safetensors --model NAME [--inflate center|average]``
(:mod:`structvit.convert`) reads a checkpoint, calls these functions and saves the result.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Mapping

import torch
import torch.nn as nn

from .checkpoint import unwrap_state_dict
from .nn.attention import StructSA

__all__ = ["INFLATE_MODES", "ConversionReport", "unwrap_state_dict", "inflate_weight", "inflate_state_dict",
           "load_uniformer", "load_deit", "load_checkpoint", "adapt_vit_state_dict"]

_log = logging.getLogger(__name__)

INFLATE_MODES = ("center", "average")


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
        inexact: why the converted model does not compute what the source model did
            (empty: it does, within float tolerance), e.g. StructSA with a key/value stride.
        notes: other adaptations made (a dropped class token, a resampled position
            embedding, a zero time embedding, ...).
    """

    loaded: list[str] = dataclasses.field(default_factory=list)
    inflated: list[str] = dataclasses.field(default_factory=list)
    sa_initialised: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    inexact: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def exact(self) -> bool:
        """True when the converted model reproduces the source model (nothing in ``inexact``);
        for an image model inflated into a video model (centre inflation): on clips of
        identical frames."""
        return not self.inexact

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors",
                 f"inflated {len(self.inflated)} 2-D kernels to 3-D" + (f": {', '.join(self.inflated)}" if self.inflated else ""),
                 f"SA-equivalent patterns in {len(self.sa_initialised)} StructSA/ConvSA blocks"
                 + (f": {', '.join(self.sa_initialised)}" if self.sa_initialised else "")]
        lines.append(f"missing keys ({len(self.missing)}): {', '.join(self.missing) or 'none'}")
        lines.append(f"unexpected keys ({len(self.unexpected)}): {', '.join(self.unexpected) or 'none'}")
        lines += [f"note: {n}" for n in self.notes]
        if self.inexact:
            lines.append("an initialisation, not an exact conversion: " + "; ".join(self.inexact))
        else:
            lines.append("exact: the converted model computes what the source model did")
        return "\n".join(lines)


def inflate_weight(weight: torch.Tensor, time: int, mode: str = "center") -> torch.Tensor:
    """Spread a 2-D kernel (..., kh, kw) over ``time`` frames: (..., time, kh, kw).

    Convolution weights (A, B, kh, kw) become (A, B, time, kh, kw); StructSA patterns
    (heads, C, D, kh, kw) / (heads, D, kh, kw) / (D, kh, kw) get their 3-D window the same way.
    ``"center"`` puts the 2-D kernel in the middle frame (zeros elsewhere): on a clip of
    identical frames the 3-D convolution equals the 2-D one frame by frame, also at the
    clip's ends. ``"average"`` repeats it divided by ``time`` (the UniFormer / I3D way):
    equal on identical frames away from the temporal padding only.
    """
    if mode not in INFLATE_MODES:
        raise ValueError(f"inflate must be one of {INFLATE_MODES}, got {mode!r}")
    if weight.dim() < 3:
        raise ValueError(f"only weights with a 2-D kernel (..., kh, kw) and at least 3 dims inflate, "
                         f"got shape {tuple(weight.shape)}")
    if not isinstance(time, int) or isinstance(time, bool) or time < 1:
        raise ValueError(f"time must be a positive int, got {time!r}")
    shape = weight.shape[:-2] + (time,) + weight.shape[-2:]
    if mode == "center":
        out = weight.new_zeros(shape)
        out[..., time // 2, :, :] = weight
        return out
    return weight.unsqueeze(-3).expand(shape) / time


def inflate_state_dict(state_dict: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor] | nn.Module,
                       mode: str = "center") -> tuple[dict[str, torch.Tensor], list[str]]:
    """Inflate every tensor (..., kh, kw) whose target (a state dict or model) is
    (..., t, kh, kw) with the same other sizes; returns the new state dict and the inflated names."""
    if mode not in INFLATE_MODES:
        raise ValueError(f"inflate must be one of {INFLATE_MODES}, got {mode!r}")
    shapes = {k: tuple(v.shape) for k, v in (target.state_dict() if isinstance(target, nn.Module) else target).items()}
    out, inflated = dict(state_dict), []
    for name, w in state_dict.items():
        want = shapes.get(name)
        if (want is not None and w.dim() >= 3 and len(want) == w.dim() + 1
                and want[:-3] == tuple(w.shape[:-2]) and want[-2:] == tuple(w.shape[-2:])):
            out[name] = inflate_weight(w, int(want[-3]), mode)
            inflated.append(name)
    return out, inflated


def _layer_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def _check_args(model, inflate) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if inflate is not None and inflate not in INFLATE_MODES:
        raise ValueError(f"inflate must be None or one of {INFLATE_MODES}, got {inflate!r}")


def _load(model: nn.Module, sd: dict[str, torch.Tensor], inflate: str | None, strict: bool, ignore_head: bool,
          report: ConversionReport) -> ConversionReport:
    """The common part: inflate, check names and shapes, load, SA-initialise the patterns
    the checkpoint lacks, and say whether the result is exact."""
    if ignore_head:
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    target = model.state_dict()
    if inflate is not None:
        sd, report.inflated = inflate_state_dict(sd, target, inflate)
    for name, w in sd.items():
        if name not in target:
            report.unexpected.append(name)
            continue
        if tuple(w.shape) != tuple(target[name].shape):
            hint = ""
            if w.dim() + 1 == target[name].dim():
                hint = " (a 2-D image kernel into a video model: pass inflate='center' or 'average')"
            elif name.startswith("head."):
                hint = " (a different number of classes: pass ignore_head=True and train a new head)"
            raise ValueError(f"size mismatch in layer {_layer_of(name)!r}: checkpoint {name} has shape "
                             f"{tuple(w.shape)}, the model expects {tuple(target[name].shape)}{hint}")
        report.loaded.append(name)
    pattern_names = set()
    strided = []
    for mname, module in model.named_modules():
        if isinstance(module, StructSA):
            keys = [f"{mname}.u_k", f"{mname}.u_v"]
            if not any(k in sd for k in keys):
                report.sa_initialised.append(mname)
                pattern_names.update(keys)
                if any(s > 1 for s in module.kv_stride):
                    strided.append(mname)
    if strided:
        stride = dict(model.named_modules())[strided[0]].kv_stride
        report.inexact.append(
            f"{len(strided)} StructSA/ConvSA blocks have a key/value stride (e.g. {strided[0]}: {stride}): they see "
            "fewer keys than SA, so their SA-equivalent patterns are only a start")
    # BatchNorm's num_batches_tracked only matters for momentum=None; older checkpoints lack it
    report.missing = [k for k in target if k not in sd and k not in pattern_names
                      and not k.endswith(".num_batches_tracked")]
    if inflate == "average" and report.inflated:
        report.inexact.append("average inflation: a clip of identical frames matches the image model only away "
                              "from the temporal zero padding")
    if report.missing:
        report.inexact.append(f"{len(report.missing)} tensors keep the model's own initialisation "
                              f"({', '.join(report.missing[:3])}{', ...' if len(report.missing) > 3 else ''})")
    if strict and (report.unexpected or report.missing):
        raise KeyError("checkpoint does not match the model (pass strict=False to load anyway):\n"
                       f"missing keys ({len(report.missing)}): {', '.join(report.missing) or 'none'}\n"
                       f"unexpected keys ({len(report.unexpected)}): {', '.join(report.unexpected) or 'none'}")
    with torch.no_grad():
        model.load_state_dict({k: sd[k] for k in report.loaded}, strict=False)
        modules = dict(model.named_modules())
        for mname in report.sa_initialised:
            modules[mname].reset_patterns("sa")
    if report.inexact:
        _log.warning("%s: the conversion is an initialisation, not an exact conversion: %s",
                     type(model).__name__, "; ".join(report.inexact))
    return report


def load_uniformer(model: nn.Module, state_dict: Mapping, inflate: str | None = None, strict: bool = True,
                   ignore_head: bool = False) -> ConversionReport:
    """Load a UniFormer (SA) or StructViT state dict into ``model`` (a StructViT of the same size).

    Args:
        model: the target, e.g. ``timm.create_model("structvit_s_4_1")``.
        state_dict: the checkpoint; ``{"model": ...}``/``{"model_state": ...}`` wrappers and a
            ``module.`` prefix are accepted.
        inflate: None (shapes must match), or "center"/"average" to spread 2-D (image)
            kernels (and StructSA windows) over time when the model is a video model.
        strict: raise ``KeyError`` on unexpected keys, or on missing keys other than the
            StructSA patterns; with False they are only reported.
        ignore_head: skip the checkpoint's ``head.*`` (e.g. a different number of
            classes); the model's head stays as it is and is reported missing.

    Returns:
        A :class:`ConversionReport`. StructSA/ConvSA modules whose ``u_k``/``u_v`` the
        checkpoint lacks are reset to the SA-equivalent patterns, so at key/value stride 1
        the model's outputs equal the SA model's (in eval mode, within float tolerance);
        with a stride ``report.exact`` is False and a warning is logged.

    Raises:
        ValueError: a tensor's shape differs from the model's (the message names the layer).
        KeyError: with ``strict``, unexpected or missing keys.
    """
    _check_args(model, inflate)
    return _load(model, unwrap_state_dict(state_dict), inflate, strict, ignore_head, ConversionReport())


def adapt_vit_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module,
                         report: ConversionReport | None = None) -> dict[str, torch.Tensor]:
    """A DeiT / timm ViT state dict adapted to a StructDeiT ``model``'s tokens.

    - Prefix tokens: a distillation token (``dist_token``, ``head_dist.*``) is dropped; the
      class token (``cls_token`` and its ``pos_embed`` row) is dropped when the model has
      none; when the model has one and the checkpoint not, the model keeps its own.
    - ``pos_embed``'s grid rows are resampled (bicubic, timm's ``resample_abs_pos_embed``)
      when the checkpoint's square grid differs from the model's ``grid_size``.
    - A video model's ``time_embed``, absent from image checkpoints, is set to zeros, so
      a clip of identical frames gives the image model's tokens (with centre inflation).

    Every change is written to ``report.notes``, and to ``report.inexact`` when the
    model then computes something else than the checkpoint's model did.
    """
    from timm.layers import resample_abs_pos_embed

    report = ConversionReport() if report is None else report
    sd = dict(state_dict)
    has_struct = any(isinstance(m, StructSA) for m in model.modules())
    src_prefix = int("cls_token" in sd) + int("dist_token" in sd)
    dst_prefix = int(getattr(model, "num_prefix_tokens", 0))
    pos = sd.get("pos_embed")
    if pos is not None:
        if pos.dim() != 3 or pos.shape[0] != 1:
            raise ValueError(f"checkpoint pos_embed must have shape (1, tokens, dim), got {tuple(pos.shape)}")
        cls_row, grid_rows = pos[:, :1], pos[:, src_prefix:]
        n = grid_rows.shape[1]
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"checkpoint pos_embed has {n} grid rows after {src_prefix} prefix token(s), "
                             "not a square grid")
        grid = tuple(model.grid_size)
        if (side, side) != grid:
            grid_rows = resample_abs_pos_embed(grid_rows, list(grid), old_size=[side, side], num_prefix_tokens=0)
            msg = f"pos_embed resampled from a {side}x{side} to a {grid[0]}x{grid[1]} grid"
            report.notes.append(msg)
            report.inexact.append(msg)
        if dst_prefix:
            cls_row = cls_row if "cls_token" in sd else model.pos_embed.detach()[:, :dst_prefix].to(pos.dtype)
            sd["pos_embed"] = torch.cat([cls_row, grid_rows], dim=1)
        else:
            sd["pos_embed"] = grid_rows
    if "dist_token" in sd:
        sd.pop("dist_token")
        for k in [k for k in sd if k.startswith("head_dist.")]:
            sd.pop(k)
        report.notes.append("dropped the distillation token (dist_token, head_dist)")
        report.inexact.append("the distillation head is dropped (DeiT averaged it with the class head)")
    if "cls_token" in sd and not dst_prefix:
        sd.pop("cls_token")
        report.notes.append("dropped the class token (the model has none)")
        report.inexact.append("the model has no class token: its head sees the mean of the patch tokens")
    elif dst_prefix and "cls_token" not in sd:
        report.notes.append("the checkpoint has no class token: the model keeps its own cls_token and its "
                            "pos_embed row")
        sd["cls_token"] = model.cls_token.detach().clone()
        report.inexact.append("the class token is new")
    if dst_prefix and has_struct:
        report.inexact.append("with a class token, StructSA's patch tokens do not attend to it (SA's did)")
    if getattr(model, "time_embed", None) is not None and "time_embed" not in sd:
        sd["time_embed"] = torch.zeros_like(model.time_embed.detach())
        report.notes.append("time_embed set to zeros (the checkpoint has none)")
    return sd


def load_deit(model: nn.Module, state_dict: Mapping, inflate: str | None = None, strict: bool = True,
              ignore_head: bool = False) -> ConversionReport:
    """Load a DeiT / timm ``VisionTransformer`` (or StructDeiT) state dict into a StructDeiT.

    The names are the same; the class token, position embedding and (video) time
    embedding are adapted by :func:`adapt_vit_state_dict`, a 2-D patch embedding is
    inflated to tubelets with ``inflate``, and StructSA/ConvSA patterns the checkpoint
    lacks get the SA-equivalent initialisation. Arguments, return value and errors as
    :func:`load_uniformer`.

    Exactness: ``attention="sa"`` with ``class_token=True`` reproduces DeiT (minus a
    distillation head); a StructSA model reproduces an SA model without class token
    (at key/value stride 1); a DeiT checkpoint into a model without class token, or
    with StructSA and a class token, is an initialisation (``report.exact`` False).
    """
    _check_args(model, inflate)
    report = ConversionReport()
    sd = adapt_vit_state_dict(unwrap_state_dict(state_dict), model, report)
    return _load(model, sd, inflate, strict, ignore_head, report)


def load_checkpoint(model: nn.Module, state_dict: Mapping, **kwargs) -> ConversionReport:
    """:func:`load_deit` for a StructDeiT model, :func:`load_uniformer` otherwise."""
    from .models import StructDeiT

    return (load_deit if isinstance(model, StructDeiT) else load_uniformer)(model, state_dict, **kwargs)
