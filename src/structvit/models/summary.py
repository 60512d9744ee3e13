"""Parameters and FLOPs of the StructViT models; ``structvit models [--paper]``.

:func:`count_flops` is the project's one FLOP counter (``structvit models``, ``structvit
report`` and the study use it). It runs one eval-mode forward pass under
:class:`torch.utils.flop_counter.FlopCounterMode` and returns **multiply-adds**: the
"FLOPs" of fvcore, which UniFormer's and StructViT's tables report. ``FlopCounterMode``
itself counts 2 FLOPs per multiply-add, so its total is halved. Matrix products,
convolutions (the StructSA op's depthwise and transposed ones included) and attention are
counted; softmax, normalisation and element-wise operations are not, by either tool.

Nothing is computed: a model on the ``meta`` device runs on meta inputs, any other model
runs under ``FakeTensorMode``, so even the base video models are counted in about a second.
On meta, ``scaled_dot_product_attention`` takes its math path (two counted ``bmm``); on a
real device its fused kernels are counted by the formulas ``structvit.ops`` registers.
A StructSA layer is counted in the form its ``backend`` runs on the model's device: the
paper's channel-wise layers always run the key-convolution form (the one the paper's FLOPs
describe); a dot-product layer under ``"auto"`` may take the fused CPU kernel on a CPU
model but the key-convolution form on meta, so pass ``backend=`` to compare like with like.

``structvit models --paper`` sets every model of the paper next to its published
parameters and GFLOPs (per view for video).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Sequence

import torch

from ..ops.checks import is_int

__all__ = ["count_params", "count_flops", "default_input_shape", "summarize", "to_markdown", "PaperRow", "PAPER_ROWS",
           "paper_table", "paper_markdown", "main"]


def count_params(model: torch.nn.Module) -> int:
    """All parameters (every parameter of the module, classifier included; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def default_input_shape(model: torch.nn.Module, batch: int = 1) -> tuple[int, ...]:
    """(B, C, H, W) for image models, (B, C, T, H, W) for video models, from the model's cfg."""
    cfg = model.pretrained_cfg
    c, h, w = cfg["input_size"]
    if getattr(model, "video", False):
        return (batch, c, cfg.get("num_frames") or model.num_frames, h, w)
    return (batch, c, h, w)


def _model_device(model: torch.nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def count_flops(model: torch.nn.Module, inputs, device: str | torch.device | None = None) -> int:
    """Multiply-adds of one eval-mode forward pass (``FlopCounterMode``'s FLOPs / 2).

    Args:
        model: any module; it is run in eval mode under ``torch.no_grad`` (its training
            flag is restored afterwards).
        inputs: the input's shape (a sequence of ints: a zero tensor of that shape is
            made), a tensor, or a tuple of tensors passed as positional arguments.
        device: where to make the input from a shape; default the model's device. A model
            on ``meta`` needs meta inputs; any other runs under ``FakeTensorMode``.

    Returns:
        int, multiply-adds (GMACs = the papers' "GFLOPs" after / 1e9).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from .. import ops  # noqa: F401  (registers the FLOP formulas of the fused kernels)

    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    elif isinstance(inputs, Sequence) and inputs and all(is_int(s) for s in inputs):
        inputs = (tuple(inputs),)
    elif not (isinstance(inputs, tuple) and inputs and all(isinstance(t, torch.Tensor) for t in inputs)):
        raise ValueError(f"inputs must be a shape (ints), a tensor or a tuple of tensors, got {inputs!r}")
    device = torch.device(device) if device is not None else _model_device(model)
    meta = device.type == "meta"
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    fake = None if meta else FakeTensorMode(allow_non_fake_inputs=True)
    try:
        with torch.no_grad():
            if fake is not None:
                fake.__enter__()
            try:
                args = tuple(torch.zeros(x, device=device) if isinstance(x, tuple) else x for x in inputs)
                with counter:
                    model(*args)
            finally:
                if fake is not None:
                    fake.__exit__(None, None, None)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops()) // 2


# --------------------------------------------------------------------------- listing


def progress_to_stderr(message: str) -> None:
    """The commands' progress lines: on stderr, so stdout holds only the table."""
    print(message, file=sys.stderr, flush=True)


def summarize(names, device: str = "meta", baselines: bool = False, progress=None, **kwargs) -> list[dict]:
    """One row per model at its default input: name, attention layers, D, key/value stride,
    input, parameters and multiply-adds.

    ``baselines`` adds, after each model, the same model with plain SA everywhere
    (StructViT: ``struct_blocks=(0, 0)``, i.e. UniFormer; other models: ``attention="sa"``).
    ``progress``: None or a callable given one line per model before it is counted (a big
    model takes seconds). ``kwargs`` go to ``timm.create_model``.
    """
    import timm

    from ..nn.attention import SelfAttention, StructSA
    from .structvit import StructViT

    rows = []
    names = list(names)
    for i, name in enumerate(names, 1):
        if progress is not None:
            progress(f"counting {name} ({i}/{len(names)}) ...")
        with torch.device(device):
            first = timm.create_model(name, **kwargs)
        variants = [("", None)]
        if baselines:
            variants.append((" (all SA = UniFormer)", {"struct_blocks": (0, 0)}) if isinstance(first, StructViT)
                            else (" (all SA)", {"attention": "sa"}))
        for suffix, extra in variants:
            if extra is None:
                model = first
            else:
                with torch.device(device):
                    model = timm.create_model(name, **{**kwargs, **extra})
            shape = default_input_shape(model)
            struct = [m for m in model.modules() if isinstance(m, StructSA)]
            attn = [m for m in model.modules() if isinstance(m, SelfAttention)]
            rows.append(dict(model=name + suffix, struct_layers=len(struct), attention_layers=len(attn),
                             num_patterns=sorted({m.num_patterns for m in struct}),
                             kv_stride=sorted({m.kv_stride for m in struct}), input="x".join(map(str, shape[1:])),
                             params=count_params(model), macs=count_flops(model, shape, device)))
    return rows


def to_markdown(rows: list[dict]) -> str:
    lines = ["| model | StructSA layers / attention layers | D | kv stride | input | params (M) "
             "| GFLOPs (multiply-adds) |",
             "|---|---|---|---|---|---:|---:|"]
    for r in rows:
        d = ", ".join(map(str, r["num_patterns"])) or "-"
        stride = ", ".join("x".join(map(str, s)) for s in r["kv_stride"]) or "-"
        lines.append(f"| {r['model']} | {r['struct_layers']} / {r['attention_layers']} | {d} | {stride} "
                     f"| {r['input']} | {r['params'] / 1e6:.2f} | {r['macs'] / 1e9:.2f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the paper's table

@dataclasses.dataclass(frozen=True)
class PaperRow:
    """One published row: the paper's label and benchmark, the registered model (with
    ``kwargs``) that reproduces it, its input (``frames`` None for images) and classes, and the
    published parameters (M; None where not published) and GFLOPs of all ``views``.

    ``corrected``: GFLOPs (per view) to compare with instead, where the published number is
    known to be wrong (``note`` says why)."""

    label: str
    bench: str
    model: str
    kwargs: dict
    frames: int | None
    classes: int
    params: float | None
    gflops: float
    views: int = 1
    corrected: float | None = None
    note: str = ""
    size: int = 224


# UniFormer-L's published 12.6 GFLOPs were counted with activation checkpointing on, which
# hid layers from fvcore; its authors give 19.8 as the correct count (Sense-X/UniFormer
# issue #75). StructViT-L-4-1's published 15.4 = 12.6 + what StructSA adds (2.8), so the
# corrected reference is 19.8 + 2.8.
_L_NOTE = ("UniFormer-L's published 12.6 GFLOPs missed the layers run under activation checkpointing; its "
           "authors give 19.8 (Sense-X/UniFormer issue #75). StructViT-L-4-1's 15.4 = 12.6 + 2.8 for StructSA, "
           "so it is compared with 19.8 + 2.8 = 22.6.")
_SA = {"struct_blocks": (0, 0)}
# Published: Kim et al., CVPR 2024 (Tables 1-4); UniFormer-L: the UniFormer paper. Video
# GFLOPs are compared per view (published total / views).
PAPER_ROWS = [
    PaperRow("UniFormer-S", "IN-1K", "structvit_s_4_1", _SA, None, 1000, 22, 3.6),
    PaperRow("StructViT-S-4-2", "IN-1K", "structvit_s_4_2", {}, None, 1000, 23, 3.6),
    PaperRow("StructViT-S-4-1", "IN-1K", "structvit_s_4_1", {}, None, 1000, 23, 4.3),
    PaperRow("StructViT-S-8-1", "IN-1K", "structvit_s_8_1", {}, None, 1000, 24, 5.4),
    PaperRow("UniFormer-B", "IN-1K", "structvit_b_4_1", _SA, None, 1000, 50, 8.3),
    PaperRow("StructViT-B-4-2", "IN-1K", "structvit_b_4_2", {}, None, 1000, 51, 8.3),
    PaperRow("StructViT-B-4-1", "IN-1K", "structvit_b_4_1", {}, None, 1000, 51, 9.9),
    PaperRow("StructViT-B-8-1", "IN-1K", "structvit_b_8_1", {}, None, 1000, 52, 12.0),
    PaperRow("UniFormer-L", "IN-1K", "structvit_l_4_1", _SA, None, 1000, 100, 12.6, corrected=19.8, note=_L_NOTE),
    PaperRow("StructViT-L-4-1", "IN-1K", "structvit_l_4_1", {}, None, 1000, 103, 15.4, corrected=19.8 + 15.4 - 12.6,
             note=_L_NOTE),
    PaperRow("DeiT-S + StructSA", "IN-1K", "structvit_deit_small", {}, None, 1000, 22.4, 5.7),
    PaperRow("DeiT-S + ConvSA", "IN-1K", "structvit_deit_small", {"attention": "convsa"}, None, 1000, 22.1, 4.6),
    PaperRow("UniFormer-S", "K400 16x1x4", "structvit_s_4_1_video", _SA, 16, 400, None, 167, 4),
    PaperRow("StructViT-S-4-2", "K400 16x1x4", "structvit_s_4_2_video", {}, 16, 400, None, 169, 4),
    PaperRow("StructViT-S-4-1", "K400 16x1x4", "structvit_s_4_1_video", {}, 16, 400, None, 327, 4),
    PaperRow("StructViT-S-8-1", "K400 16x1x4", "structvit_s_8_1_video", {}, 16, 400, None, 541, 4),
    PaperRow("UniFormer-B", "K400 32x1x4", "structvit_b_4_1_video", _SA, 32, 400, None, 1036, 4),
    PaperRow("StructViT-B-4-2", "K400 32x1x4", "structvit_b_4_2_video", {}, 32, 400, None, 1045, 4),
    PaperRow("StructViT-B-4-1", "K400 32x1x4", "structvit_b_4_1_video", {}, 32, 400, None, 2658, 4),
    PaperRow("UniFormer-S", "SSv1/v2 16x3x1", "structvit_s_4_1_video", _SA, 16, 174, None, 125, 3),
    PaperRow("StructViT-S-4-2", "SSv1/v2 16x3x1", "structvit_s_4_2_video", {}, 16, 174, None, 126, 3),
    PaperRow("StructViT-S-4-1", "SSv1/v2 16x3x1", "structvit_s_4_1_video", {}, 16, 174, None, 246, 3),
    PaperRow("StructViT-S-8-1", "SSv1/v2 16x3x1", "structvit_s_8_1_video", {}, 16, 174, None, 405, 3),
    PaperRow("UniFormer-B", "SSv1/v2 32x3x1", "structvit_b_4_1_video", _SA, 32, 174, None, 777, 3),
    PaperRow("StructViT-B-4-2", "SSv1/v2 32x3x1", "structvit_b_4_2_video", {}, 32, 174, None, 784, 3),
    PaperRow("StructViT-B-4-1", "SSv1/v2 32x3x1", "structvit_b_4_1_video", {}, 32, 174, None, 1963, 3),
]


def paper_table(rows: Sequence[PaperRow] | None = None, progress=None) -> tuple[list[dict], list[str]]:
    """Count every row (default :data:`PAPER_ROWS`) on the meta device; ``progress`` as in
    :func:`summarize` (one line per model counted).

    Returns (results, notes): one dict per counted row with the counted and published
    parameters (M) and GFLOPs per view, and their relative differences (GFLOPs against
    ``corrected`` where a row has one); the notes name skipped rows (model not registered)
    and explain corrections.
    """
    import importlib

    import timm

    from .. import models  # noqa: F401  (registers the models)

    try:  # the DeiT ablation backbone, if this installation has it
        importlib.import_module(f"{__package__}.deit")
    except ImportError:
        pass
    results, notes, cache = [], [], {}
    registered = set(timm.list_models("structvit_*"))
    rows = list(PAPER_ROWS if rows is None else rows)
    for i, row in enumerate(rows, 1):
        if row.model not in registered:
            note = f"{row.label} ({row.bench}): {row.model} is not registered, row skipped."
            if note not in notes:
                notes.append(note)
            continue
        key = (row.model, tuple(sorted(row.kwargs.items())), row.frames, row.size, row.classes)
        if key not in cache:
            if progress is not None:
                progress(f"counting {row.model} for {row.label} ({i}/{len(rows)} rows) ...")
            extra = {} if row.frames is None else {"num_frames": row.frames}
            with torch.device("meta"):
                model = timm.create_model(row.model, num_classes=row.classes, **extra, **row.kwargs)
            shape = (1, 3, row.size, row.size) if row.frames is None else (1, 3, row.frames, row.size, row.size)
            cache[key] = (count_params(model), count_flops(model, shape), "x".join(map(str, shape[1:])))
        params, macs, shape = cache[key]
        per_view = row.gflops / row.views
        reference = per_view if row.corrected is None else row.corrected
        if row.note and row.note not in notes:
            notes.append(row.note)
        results.append(dict(label=row.label, bench=row.bench, model=row.model, kwargs=row.kwargs, input=shape,
                            classes=row.classes, params_m=params / 1e6, pub_params_m=row.params,
                            params_diff=None if row.params is None else params / 1e6 / row.params - 1,
                            gflops=macs / 1e9, pub_gflops=per_view, pub_total=row.gflops, views=row.views,
                            reference_gflops=reference, gflops_diff=macs / 1e9 / reference - 1,
                            corrected=row.corrected is not None))
    return results, notes


def _kwargs_text(kwargs: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in kwargs.items())


def paper_markdown(results: list[dict], notes: Sequence[str] = ()) -> str:
    lines = ["| paper row | benchmark | model | input | classes | params (M) | published | diff "
             "| GFLOPs / view | published | diff |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        model = f"`{r['model']}`" + (f" ({_kwargs_text(r['kwargs'])})" if r["kwargs"] else "")
        pub_p = "-" if r["pub_params_m"] is None else f"{r['pub_params_m']:g}"
        diff_p = "-" if r["params_diff"] is None else f"{100 * r['params_diff']:+.1f}%"
        pub_f = f"{r['pub_gflops']:.1f}" if r["views"] == 1 else f"{r['pub_total']:g}/{r['views']} = {r['pub_gflops']:.1f}"
        if r["corrected"]:
            pub_f += f" (corrected: {r['reference_gflops']:.1f}, see below)"
        lines.append(f"| {r['label']} | {r['bench']} | {model} | {r['input']} | {r['classes']} | {r['params_m']:.2f} "
                     f"| {pub_p} | {diff_p} | {r['gflops']:.2f} | {pub_f} | {100 * r['gflops_diff']:+.1f}% |")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .names import project_model_names

    parser = argparse.ArgumentParser(
        prog="structvit models",
        description="Parameters and GFLOPs of the registered StructViT models at their default input (one "
                    "image / one clip), as a Markdown table. GFLOPs are multiply-adds (fvcore's convention, "
                    "the papers'), counted with torch.utils.flop_counter on the meta device.")
    parser.add_argument("names", nargs="*", help="models to list (default: every registered structvit_* model)")
    parser.add_argument("--paper", action="store_true",
                        help="the paper's models next to their published parameters and GFLOPs per view")
    parser.add_argument("--baselines", action="store_true",
                        help="also list each model with plain SA in every block (= UniFormer)")
    parser.add_argument("--dense", action="store_true",
                        help="the paper's dense-prediction rows (Mask R-CNN, Table 8; Semantic FPN at 512x2048, "
                             "Table 9) next to their published parameters and GFLOPs")
    parser.add_argument("--write", metavar="PATH", default=None,
                        help="with --dense: also write the table as a Markdown page to PATH")
    parser.add_argument("--backend", default=None, choices=("auto", "naive", "correlation", "keyconv"),
                        help="StructSA op backend to count (default: the models' 'auto')")
    args = parser.parse_args(argv)
    if args.write is not None and not args.dense:
        parser.error("--write goes with --dense")
    if args.dense:
        if args.names or args.baselines or args.backend or args.paper:
            parser.error("--dense takes no model names, --paper, --baselines or --backend")
        from ..dense.flops import write_dense_markdown

        print(write_dense_markdown(args.write, progress=progress_to_stderr), end="")
        return 0
    if args.paper:
        if args.names or args.baselines or args.backend:
            parser.error("--paper takes no model names, --baselines or --backend")
        print(paper_markdown(*paper_table(progress=progress_to_stderr)))
        return 0
    registered = project_model_names()
    unknown = [n for n in args.names if n not in registered]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; registered: {', '.join(registered)}")
    kwargs = {} if args.backend is None else {"backend": args.backend}
    rows = summarize(args.names or list(registered), baselines=args.baselines, progress=progress_to_stderr, **kwargs)
    print(to_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
