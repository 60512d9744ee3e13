"""Parameters and GFLOPs of whole detectors and segmenters: the paper's Tables 8 and 9.

Counting convention (ours): parameters of the whole model (backbone without its classifier,
FPN, heads); GFLOPs = multiply-adds of one eval-mode forward pass counted by
:class:`torch.utils.flop_counter.FlopCounterMode` on the meta device
(:func:`structvit.models.summary.count_flops`): every convolution, linear layer and matrix
product, including the attention products inside ``scaled_dot_product_attention`` (the
StructSA keys are the D * N convolved keys); norms, activations and resizes are not counted.

The published numbers were counted differently: mmcv's ``get_flops`` (mmdet / mmseg) hooks
modules (convolutions, linear layers, norms, activations, upsampling), so it misses the
attention's two matrix products, which are functions, not modules; UniFormer's authors add
them by hand (Sense-X/UniFormer issue #50). Where both add the attention correctly the two
conventions agree to about 1% (norms and activations are a small share): the UniFormer rows
below reproduce. Mask R-CNN's GFLOPs (Table 8 gives none) are the backbone and FPN only at
800 x 1280: the RPN and RoI heads depend on the proposals.

Table 9's StructViT rows do not reproduce as counted: 321 vs 271 (S) and 656 vs 529 (B). They
do, within about 1%, if StructSA's extra cost over SA (the attention over D x the keys, the
pattern convolutions) is taken for every stage-3 block at the 32 x 32 window, the two / five
global blocks included (``paper_estimate``: UniFormer's count plus the difference between the
all-windowed StructViT and UniFormer). That is our reading of how the published figures were
added up, not a statement of the authors; the model as built (global every 4th block, as
UniFormer's hybrid backbone) costs what the ``gflops`` column says.

    structvit models --dense [--write docs/results/dense_models.md]
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

__all__ = ["DenseRow", "DENSE_ROWS", "build_row_model", "count_row", "dense_table", "dense_markdown",
           "write_dense_markdown"]


@dataclasses.dataclass(frozen=True)
class DenseRow:
    """One published row of Table 8 (Mask R-CNN, COCO) or 9 (Semantic FPN, ADE20K).

    ``params`` (M) and ``gflops`` (None: not published) are the paper's; ``size`` the input
    (H, W) the GFLOPs are counted at; ``kwargs`` the backbone's options."""

    label: str
    table: str
    task: str  # "maskrcnn" or "semfpn"
    model: str
    kwargs: dict
    params: float
    gflops: Optional[float]
    size: tuple[int, int]
    classes: int


_SA = {"struct_blocks": (0, 0)}
# Kim et al., CVPR 2024, Appendix C: Table 8 (COCO val2017, Mask R-CNN 1x, params of the whole
# detector) and Table 9 (ADE20K, Semantic FPN 80K, GFLOPs at 512 x 2048)
DENSE_ROWS = [
    DenseRow("UniFormer-S h14", "Table 8", "maskrcnn", "structvit_s_4_1_h14", _SA, 41, None, (800, 1280), 81),
    DenseRow("StructViT-S-4-1 h14", "Table 8", "maskrcnn", "structvit_s_4_1_h14", {}, 42, None, (800, 1280), 81),
    DenseRow("UniFormer-B h14", "Table 8", "maskrcnn", "structvit_b_4_1_h14", _SA, 69, None, (800, 1280), 81),
    DenseRow("StructViT-B-4-1 h14", "Table 8", "maskrcnn", "structvit_b_4_1_h14", {}, 70, None, (800, 1280), 81),
    DenseRow("UniFormer-S h32", "Table 9", "semfpn", "structvit_s_4_1_h32", _SA, 25, 199, (512, 2048), 150),
    DenseRow("StructViT-S-4-1 h32", "Table 9", "semfpn", "structvit_s_4_1_h32", {}, 26, 271, (512, 2048), 150),
    DenseRow("UniFormer-B h32", "Table 9", "semfpn", "structvit_b_4_1_h32", _SA, 54, 350, (512, 2048), 150),
    DenseRow("StructViT-B-4-1 h32", "Table 9", "semfpn", "structvit_b_4_1_h32", {}, 54, 529, (512, 2048), 150),
]


def build_row_model(row: DenseRow, device: str = "meta", **extra_kwargs) -> torch.nn.Module:
    """The row's whole model (Mask R-CNN or Semantic FPN) on ``device``."""
    kwargs = {**row.kwargs, **extra_kwargs}
    with torch.device(device):
        if row.task == "semfpn":
            from .semantic_fpn import build_semantic_fpn
            return build_semantic_fpn(row.model, row.classes, backbone_kwargs=kwargs)
        if row.task == "maskrcnn":
            from .mask_rcnn import build_mask_rcnn
            return build_mask_rcnn(row.model, row.classes, backbone_kwargs=kwargs)
    raise ValueError(f"task must be 'maskrcnn' or 'semfpn', got {row.task!r}")


def _gmacs(row: DenseRow, model: torch.nn.Module) -> float:
    from ..models.summary import count_flops

    counted = model.backbone if row.task == "maskrcnn" else model  # Mask R-CNN: backbone + FPN
    return count_flops(counted, (1, 3, *row.size)) / 1e9


def _rel(ours: Optional[float], paper: Optional[float]) -> Optional[float]:
    return None if ours is None or paper is None else ours / paper - 1


def count_row(row: DenseRow) -> dict:
    """Count one row on the meta device: params (M), gflops (counted), paper_estimate (StructViT
    Semantic FPN rows: see the module docstring), and the relative differences to the paper."""
    from ..models.summary import count_params

    model = build_row_model(row)
    params = count_params(model) / 1e6
    gflops = _gmacs(row, model)
    estimate = None
    if row.task == "semfpn" and row.kwargs.get("struct_blocks") != (0, 0):
        sa = dataclasses.replace(row, kwargs={**row.kwargs, **_SA})
        sa_hybrid = _gmacs(sa, build_row_model(sa))
        sa_windows = _gmacs(sa, build_row_model(sa, window_pattern="all"))
        struct_windows = _gmacs(row, build_row_model(row, window_pattern="all"))
        estimate = sa_hybrid + struct_windows - sa_windows
    return dict(label=row.label, table=row.table, model=row.model, kwargs=dict(row.kwargs), size=row.size,
                params=params, paper_params=row.params, params_diff=_rel(params, row.params),
                gflops=gflops, paper_gflops=row.gflops, gflops_diff=_rel(gflops, row.gflops),
                paper_estimate=estimate, estimate_diff=_rel(estimate, row.gflops))


def dense_table(rows: Sequence[DenseRow] = DENSE_ROWS, progress: Callable[[str], None] | None = None) -> list[dict]:
    """:func:`count_row` for every row."""
    out = []
    for row in rows:
        if progress is not None:
            progress(f"counting {row.label} ({row.table})")
        out.append(count_row(row))
    return out


def _pct(x: Optional[float]) -> str:
    return "" if x is None else f"{100 * x:+.1f}%"


def dense_markdown(results: Sequence[dict]) -> str:
    """The counted rows beside the published ones, with the convention stated."""
    lines = [
        "# Dense prediction: parameters and GFLOPs (Tables 8 and 9)",
        "",
        "Written by `structvit models --dense --write docs/results/dense_models.md`.",
        "",
        "Parameters: the whole model (backbone without classifier, FPN, heads), in millions; the paper "
        "rounds to 1M. GFLOPs: multiply-adds of one forward pass counted with "
        "`torch.utils.flop_counter.FlopCounterMode` (convolutions, linear layers, matrix products, the "
        "attention inside `scaled_dot_product_attention`; norms and activations not counted). The paper's "
        "figures come from mmcv's module counter plus the attention products added by hand (UniFormer's "
        "convention). Mask R-CNN (Table 8 publishes no GFLOPs): backbone + FPN at 800 x 1280 only.",
        "",
        "| row | table | model (options) | input | params (M) | paper | diff | GFLOPs | paper | diff "
        "| paper-convention estimate | diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        opts = ", ".join(f"{k}={v}" for k, v in r["kwargs"].items())
        model = r["model"] + (f" ({opts})" if opts else "")
        est = "" if r["paper_estimate"] is None else f"{r['paper_estimate']:.1f}"
        lines.append(f"| {r['label']} | {r['table']} | {model} | {r['size'][0]} x {r['size'][1]} "
                     f"| {r['params']:.1f} | {r['paper_params']} | {_pct(r['params_diff'])} | {r['gflops']:.1f} "
                     f"| {'' if r['paper_gflops'] is None else r['paper_gflops']} | {_pct(r['gflops_diff'])} "
                     f"| {est} | {_pct(r['estimate_diff'])} |")
    lines += [
        "",
        "Every parameter count and the UniFormer GFLOPs reproduce. The StructViT Semantic FPN GFLOPs, as "
        "counted, exceed the published ones: in UniFormer's hybrid h32 backbone every 4th stage-3 block "
        "attends over the whole 32 x 128 map at 512 x 2048, and StructSA multiplies that attention by D = 4. "
        "The published figures are matched (last columns) if StructSA's extra cost over SA is taken with "
        "every stage-3 block at the 32 x 32 window (UniFormer's count + all-windowed StructViT - "
        "all-windowed UniFormer): our reading of how the paper added them up, not the cost of the model "
        "as built.",
    ]
    return "\n".join(lines) + "\n"


def write_dense_markdown(path: str | None = None, progress: Callable[[str], None] | None = None) -> str:
    """Count every row and return the page; also write it to ``path`` if given."""
    text = dense_markdown(dense_table(progress=progress))
    if path is not None:
        from ..checkpoint import atomic_write

        with atomic_write(path) as tmp:
            Path(tmp).write_text(text)
    return text
