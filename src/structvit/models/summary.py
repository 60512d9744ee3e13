"""``structvit models``: parameters and FLOPs of every registered StructViT model.

FLOPs come from :class:`torch.utils.flop_counter.FlopCounterMode` (no fvcore), run on
the ``meta`` device by default, so even the base video models are counted in seconds
without allocating memory. The counter sees matrix products, convolutions (including
the StructSA op's grouped and transposed convolutions) and fused attention, and counts
a multiply-add as 2 FLOPs; papers that used fvcore (UniFormer's and StructViT's tables)
report multiply-adds, i.e. the GMACs column. Softmax, normalisation and element-wise
operations are not counted by either tool.

The GMACs/GFLOPs columns count the StructSA op as the models run it (backend "auto",
which on large inputs prefers the O(N)-memory key-convolution form, D times the attention
FLOPs); the last column counts the correlation (folded) form, the FLOP floor of
DESIGN.md section 1.
"""
from __future__ import annotations

import argparse
import sys

import torch

__all__ = ["count_params", "count_flops", "default_input_shape", "summarize", "main"]


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def default_input_shape(model: torch.nn.Module, batch: int = 1) -> tuple[int, ...]:
    """(B, C, H, W) for image models, (B, C, T, H, W) for video models, from the model's cfg."""
    cfg = model.pretrained_cfg
    c, h, w = cfg["input_size"]
    if getattr(model, "video", False):
        return (batch, c, cfg.get("num_frames", model.num_frames), h, w)
    return (batch, c, h, w)


def count_flops(model: torch.nn.Module, shape: tuple[int, ...], device: str | torch.device = "meta") -> int:
    """FLOPs (2 per multiply-add) of one eval-mode forward pass on an input of ``shape``."""
    from torch.utils.flop_counter import FlopCounterMode

    model = model.eval()
    x = torch.zeros(shape, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return int(counter.get_total_flops())


def summarize(names, device: str = "meta", baselines: bool = False, **kwargs) -> list[dict]:
    """One row per model: name, blocks, input shape, parameters and FLOPs.

    ``baselines`` adds, after each model, the same model with plain SA everywhere
    (``struct_blocks=(0, 0)``, i.e. UniFormer).
    """
    import timm

    from ..nn.attention import StructSA

    rows = []
    for name in names:
        variants = [("", {})] + ([(" (all SA = UniFormer)", {"struct_blocks": (0, 0)})] if baselines else [])
        for suffix, extra in variants:
            with torch.device(device):
                model = timm.create_model(name, **{**kwargs, **extra})
            shape = default_input_shape(model)
            flops = count_flops(model, shape, device)
            min_flops = flops
            if any(isinstance(m, StructSA) for m in model.modules()) and "backend" not in kwargs:
                with torch.device(device):  # the correlation (folded) form: fewest FLOPs
                    floor_model = timm.create_model(name, **{**kwargs, **extra, "backend": "correlation"})
                min_flops = count_flops(floor_model, shape, device)
            rows.append(dict(model=name + suffix, struct_blocks=model.struct_blocks, attention=model.attention,
                             window="x".join(map(str, model.window)), input="x".join(map(str, shape[1:])),
                             params=count_params(model), flops=flops, min_flops=min_flops))
    return rows


def to_markdown(rows: list[dict]) -> str:
    lines = ["| model | StructSA blocks (stage 3, 4) | window | input | params (M) | GMACs | GFLOPs "
             "| GMACs, fewest-FLOP form |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        a, b = r["struct_blocks"]
        blocks = "none (SA)" if a == b == 0 else f"{a}, {b}" + (" (ConvSA)" if r["attention"] == "convsa" else "")
        lines.append(f"| {r['model']} | {blocks} | {r['window'] if a or b else '-'} | {r['input']} | "
                     f"{r['params'] / 1e6:.2f} | {r['flops'] / 2e9:.2f} | {r['flops'] / 1e9:.2f} | {r['min_flops'] / 2e9:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from . import MODEL_NAMES

    parser = argparse.ArgumentParser(
        prog="structvit models",
        description="Parameters and FLOPs (torch.utils.flop_counter) of the registered StructViT models at their "
                    "default input (one clip / one image), as a Markdown table. GMACs = multiply-adds (the "
                    "'FLOPs' of fvcore-based papers); GFLOPs = 2 x GMACs.")
    parser.add_argument("names", nargs="*", help=f"models to list (default: all of {', '.join(MODEL_NAMES)})")
    parser.add_argument("--baselines", action="store_true",
                        help="also list each model with plain SA in every block (= UniFormer)")
    parser.add_argument("--device", default="meta",
                        help="device to count on (default 'meta': no memory, no compute)")
    parser.add_argument("--backend", default=None, choices=("auto", "correlation", "keyconv", "naive"),
                        help="StructSA op backend to count (default: the models' 'auto', which trades FLOPs "
                             "for memory on large inputs)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in MODEL_NAMES]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; registered: {', '.join(MODEL_NAMES)}")
    kwargs = {} if args.backend is None else {"backend": args.backend}
    rows = summarize(args.names or list(MODEL_NAMES), device=args.device, baselines=args.baselines, **kwargs)
    print(to_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
