"""``structvit report MODEL``: parameters, FLOPs per block type, activation memory, throughput.

FLOPs are those of the project's one counter, :func:`structvit.models.summary.count_flops`
(``torch.utils.flop_counter.FlopCounterMode`` with the formulas :mod:`structvit.ops`
registers: the fused StructSA kernel and PyTorch's CPU attention kernel
``aten._scaled_dot_product_flash_attention_for_cpu``, which the counter would otherwise
count as 0); the report gives FLOPs (2 per multiply-add; softmax, norms and element-wise
ops are not counted) and multiply-adds, and splits them over the parts of the model with
forward hooks under the same counter.

Each attention layer's count is checked against the analytic cost of the form it runs
(per head, multiply-adds; FLOPs = 2 x MACs), for a query grid of N tokens and N' keys
(N' = prod(ceil(n / s)) with key/value stride s), key window M, value window Mv, D
patterns, head width C (Cv for values):

- SA: 2 N^2 C (q k^T and A V), plus the qkv and proj layers;
- StructSA "keyconv" (and "naive", which does the same products with gathered
  contexts): the pattern convolutions N' D (M C + Mv Cv) and attention over the D N'
  keys, N D N' (C + Cv) -- the paper's form, any layout and stride;
- StructSA "correlation" (dot-product layouts, stride 1): N^2 C + N^2 M D + the value
  side, folded (N^2 M D + N^2 Cv, when M <= Cv) or shifted (N M D Cv + D N^2 Cv);
- StructSA "fused": the folded form, N^2 (C + Cv) + 2 N^2 M D.

M is the window the op really uses (an image grid sees only the centre frame of a 3-D
window); the backend is the one the layer ran in the counted forward ("auto" resolved by
the op itself).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import contextmanager

import torch
import torch.nn as nn

from .config import settings

__all__ = ["flop_counter", "count_flops_by_block", "attention_flops_analytic", "resolved_backend",
           "activation_memory", "throughput", "report", "format_report", "main"]


def flop_counter(display: bool = False):
    """The counter of :func:`structvit.models.summary.count_flops`: a FlopCounterMode with the
    formulas :mod:`structvit.ops` registers (fused StructSA kernel, CPU fused attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    from . import ops  # noqa: F401  (registers the FLOP formulas)

    return FlopCounterMode(display=display)


# --------------------------------------------------------------------------- analytic


def _layer_shapes(module, grid) -> dict:
    """n, n_kv, heads, c, cv, d, m, m_v of a StructSA layer on ``grid`` (the op's canonical view)."""
    rank = len(grid)
    u_k, u_v = module.canonical_patterns(rank)
    stride = module.stride_for(rank)
    grid3 = (1,) * (3 - rank) + tuple(grid)
    n_kv = math.prod(-(-g // st) for g, st in zip(grid3, stride))
    return dict(n=math.prod(grid3), n_kv=n_kv, heads=module.num_heads, c=module.head_dim, cv=module.head_dim,
                d=module.num_patterns, m=math.prod(u_k.shape[3:]), m_v=math.prod(u_v.shape[3:]))


def resolved_backend(module, batch: int, grid) -> str:
    """The StructSA backend a layer runs for a (batch, N, dim) input on ``grid`` (CPU or the
    layer's device; "auto" resolved by the op's :func:`structvit.ops.resolve_backend`)."""
    from .nn.attention import StructSA
    from .ops import resolve_backend

    if not isinstance(module, StructSA):
        return "sa"
    rank = len(grid)
    u_k, u_v = module.canonical_patterns(rank)  # (hu, cu, D, kt, kh, kw)
    if rank == 2:
        u_k, u_v = u_k[..., 0, :, :], u_v[..., 0, :, :]
    lead = {"channel": (), "head": (slice(None), 0), "shared": (0, 0)}[module.patterns]
    u_k, u_v = u_k.detach()[lead], u_v.detach()[lead]  # the op's layout for this grid rank
    q = torch.empty((batch, module.num_heads, math.prod(grid), module.head_dim), device=module.qkv.weight.device,
                    dtype=module.qkv.weight.dtype)
    return resolve_backend(q, u_k, tuple(grid), u_v=u_v, kv_stride=module.stride_for(rank)[3 - rank:],
                           backend=module.backend, memory_limit=module.memory_limit)


def attention_flops_analytic(module, batch: int, grid, backend: str | None = None) -> dict[str, int]:
    """Analytic FLOPs of one attention layer on a (B, N, dim) input over ``grid``.

    Returns ``{"attention": ..., "linear": ..., "total": ..., "backend": ...}``: the op
    (q k^T ... A V) and the qkv/proj projections, FLOPs = 2 x multiply-adds.
    """
    from .nn.attention import StructSA

    grid = tuple(grid)
    n, heads, c = math.prod(grid), module.num_heads, module.head_dim
    dim = module.dim
    linear = 2 * batch * n * (dim * 3 * dim + dim * dim)
    if not isinstance(module, StructSA):
        macs = 2 * n * n * c
        backend = "sa"
    else:
        backend = backend or resolved_backend(module, batch, grid)
        sh = _layer_shapes(module, grid)
        n_kv, cv, d, m, m_v = sh["n_kv"], sh["cv"], sh["d"], sh["m"], sh["m_v"]
        if backend in ("keyconv", "naive"):
            macs = n_kv * d * (m * c + m_v * cv) + n * d * n_kv * (c + cv)
        elif backend == "correlation":
            value = n * n * m_v * d + n * n * cv if m_v <= cv else n * m_v * d * cv + d * n * n * cv
            macs = n * n * c + n * n * m * d + value
        elif backend == "fused":
            macs = n * n * (c + cv) + 2 * n * n * m * d
        else:
            raise ValueError(f"backend must be one of 'keyconv', 'naive', 'correlation', 'fused', got {backend!r}")
    attention = 2 * batch * heads * macs
    return {"attention": attention, "linear": linear, "total": attention + linear, "backend": backend}


# --------------------------------------------------------------------------- counting


def _block_kind(block: nn.Module) -> str:
    from .viz.capture import layer_kind

    attn = getattr(block, "attn", None)
    if attn is not None:
        try:
            return layer_kind(attn)
        except TypeError:
            return "conv"
    return "other"


def _parts(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """(name, part kind, module) covering a StructViT or a DeiT-style model: embeddings,
    blocks, head (any other model: one part)."""
    if not hasattr(model, "stages"):
        if isinstance(getattr(model, "blocks", None), nn.ModuleList) and hasattr(model, "patch_embed"):
            return ([("patch_embed", "patch embeddings", model.patch_embed)]
                    + [(f"blocks.{i}", _block_kind(blk), blk) for i, blk in enumerate(model.blocks)]
                    + [(n, "head", getattr(model, n)) for n in ("norm", "head") if hasattr(model, n)])
        return [("model", "other", model)]
    parts = []
    for s, (embed, blocks) in enumerate(model.stages(), 1):
        parts.append((f"patch_embed{s}", "patch embeddings", embed))
        for i, blk in enumerate(blocks):
            parts.append((f"blocks{s}.{i}", _block_kind(blk), blk))
    parts.append(("norm", "head", model.norm))
    parts.append(("head", "head", model.head))
    return parts


@contextmanager
def _hooks(pairs, counter, store):
    handles = []

    def pre(key):
        def f(mod, args):
            store.setdefault(key, 0)
            store[key] -= counter.get_total_flops()
        return f

    def post(key):
        def f(mod, args, out):
            store[key] += counter.get_total_flops()
        return f

    for key, mod in pairs:
        handles.append(mod.register_forward_pre_hook(pre(key)))
        handles.append(mod.register_forward_hook(post(key)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def count_flops_by_block(model: nn.Module, x: torch.Tensor) -> dict:
    """One eval-mode forward under the FLOP counter; FLOPs per part and per attention layer.

    Returns ``{"total": int, "parts": [{name, kind, flops, params}], "attention": [{name, kind,
    backend, grid, counted, analytic, linear_counted, ...}]}``; the attention entries count the
    layer alone (``counted`` = op + projections) next to the analytic formula. ``total`` is
    the counter's whole-model count (it equals the sum of the parts for a StructViT).
    """
    from .viz.capture import attention_layers, layer_kind

    model = model.eval()
    parts = _parts(model)
    layers = attention_layers(model)
    grids: dict[str, tuple] = {}

    def grid_hook(name):
        def f(mod, args):
            xs = args[0]
            grids[name] = (xs.shape[0], tuple(int(s) for s in args[1]) if len(args) > 1 else None)
        return f

    counter = flop_counter()
    store: dict[str, int] = {}
    ghandles = [m.register_forward_pre_hook(grid_hook(n)) for n, m in layers]
    try:
        with torch.no_grad(), _hooks([(p[0], p[2]) for p in parts] + [("attn:" + n, m) for n, m in layers],
                                     counter, store), counter:
            model(x)
    finally:
        for h in ghandles:
            h.remove()
    total = int(counter.get_total_flops())
    out_parts = [dict(name=n, kind=k, flops=int(store.get(n, 0)), params=sum(p.numel() for p in m.parameters()))
                 for n, k, m in parts]
    attn = []
    for name, m in layers:
        if name not in grids or grids[name][1] is None:
            continue
        b, grid = grids[name]
        ana = attention_flops_analytic(m, b, grid, getattr(m, "last_backend", None))  # the backend that ran
        counted = int(store.get("attn:" + name, 0))
        attn.append(dict(name=name, kind=layer_kind(m), backend=ana["backend"], grid=list(grid), tokens=math.prod(grid),
                         counted=counted, analytic=ana["total"], analytic_attention=ana["attention"],
                         analytic_linear=ana["linear"], match=counted == ana["total"]))
    return {"total": total, "parts": out_parts, "attention": attn}


# --------------------------------------------------------------------------- measurements


def activation_memory(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the activations a training-mode forward saves for backward (unique storages,
    parameters excluded): the activation memory of training at this batch size."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in param_ptrs and ptr != 0:
                seen[ptr] = max(seen.get(ptr, 0), st.nbytes())
        except (RuntimeError, NotImplementedError):
            pass
        return t

    was = model.training
    model.train()
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
        del out
    finally:
        model.train(was)
    return int(sum(seen.values()))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(model: nn.Module, x: torch.Tensor, min_time: float = 1.0, min_iters: int = 3) -> dict:
    """Inference samples per second (eval, no grad) and, on CUDA, peak memory of a forward."""
    model = model.eval()
    device = x.device
    with torch.no_grad():
        model(x)  # warm-up
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        iters, t0 = 0, time.perf_counter()
        while iters < min_iters or time.perf_counter() - t0 < min_time:
            model(x)
            iters += 1
        _sync(device)
        dt = time.perf_counter() - t0
    res = {"samples_per_s": x.shape[0] * iters / dt, "latency_ms": 1000 * dt / iters, "iters": iters}
    if device.type == "cuda":
        res["inference_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return res


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)


def report(name: str, input_size=None, batch: int = 1, device: str | None = None, measure: bool = True,
           model_kwargs: dict | None = None, count_device: str = "meta", min_time: float = 1.0) -> dict:
    """Everything ``structvit report`` prints, as a dict (see :func:`format_report`)."""
    import timm

    from . import models
    from .models.summary import count_flops, default_input_shape

    models.check_model_name(name, "MODEL")
    kwargs = dict(model_kwargs or {})
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with torch.device(count_device):
        counted_model = timm.create_model(name, **kwargs)
    shape = list(default_input_shape(counted_model, batch))
    if input_size is not None:
        sizes = list(input_size)
        video = bool(counted_model.video)
        if video and len(sizes) == 3:
            shape[2:] = sizes
        elif len(sizes) == 2:
            shape[-2:] = sizes
        elif len(sizes) == 1:
            shape[-2:] = sizes * 2
        else:
            raise ValueError(f"--input-size must be S, H,W{' or T,H,W' if video else ''}, got {input_size}")
    shape = tuple(shape)
    flops = count_flops_by_block(counted_model, torch.zeros(shape, device=count_device))
    macs = count_flops(counted_model, shape, count_device)  # the project's counter, whole model
    by_kind: dict[str, dict] = {}
    for p in flops["parts"]:
        e = by_kind.setdefault(p["kind"], dict(count=0, params=0, flops=0))
        e["count"] += 1
        e["params"] += p["params"]
        e["flops"] += p["flops"]
    for a in flops["attention"]:
        e = by_kind.setdefault(a["kind"], dict(count=0, params=0, flops=0))
        e["attention_op_flops"] = e.get("attention_op_flops", 0) + a["counted"] - a["analytic_linear"]
    params = sum(p.numel() for p in counted_model.parameters())
    out = dict(model=name, model_kwargs=kwargs, input=list(shape), params=params, flops=2 * macs, macs=macs,
               by_kind=by_kind, attention_layers=flops["attention"],
               flops_check=all(a["match"] for a in flops["attention"]) and flops["total"] == 2 * macs,
               device=_device_name(device))
    if measure:
        torch.manual_seed(0)
        model = timm.create_model(name, **kwargs).to(device)
        x = torch.randn(shape, device=device)
        out["activation_bytes_train"] = activation_memory(model, x)
        out.update(throughput(model, x, min_time=min_time))
    return out


def _fmt_int(v: float, scale: float, digits: int = 3) -> str:
    return f"{v / scale:.{digits}f}"


def format_report(r: dict) -> str:
    lines = [f"model {r['model']}" + (f" {json.dumps(r['model_kwargs'])}" if r["model_kwargs"] else "")
             + f", input {'x'.join(map(str, r['input']))}",
             f"parameters {r['params'] / 1e6:.3f} M, GFLOPs {r['flops'] / 1e9:.3f} (GMACs {r['macs'] / 1e9:.3f}; "
             f"FlopCounterMode, 2 FLOPs per multiply-add)", "",
             "| part | count | params (M) | GFLOPs | share | of which attention op GFLOPs |",
             "|---|---:|---:|---:|---:|---:|"]
    label = {"patch embeddings": "patch embeddings", "conv": "conv blocks", "sa": "SA blocks",
             "convsa": "ConvSA blocks", "structsa": "StructSA blocks", "head": "head (norm, pool, classifier)",
             "other": "other"}
    for kind, e in r["by_kind"].items():
        share = 100 * e["flops"] / r["flops"] if r["flops"] else 0.0
        op = _fmt_int(e["attention_op_flops"], 1e9, 4) if "attention_op_flops" in e else "-"
        lines.append(f"| {label.get(kind, kind)} | {e['count']} | {e['params'] / 1e6:.3f} | {e['flops'] / 1e9:.4f} | "
                     f"{share:.1f}% | {op} |")
    lines += ["", "attention layers, counted vs analytic (op + qkv/proj; formulas: `structvit.report`'s docstring):",
              "| layer | kind | backend | grid | counted GFLOPs | analytic GFLOPs | match |",
              "|---|---|---|---|---:|---:|---|"]
    for a in r["attention_layers"]:
        lines.append(f"| {a['name']} | {a['kind']} | {a['backend']} | {'x'.join(map(str, a['grid']))} | "
                     f"{a['counted'] / 1e9:.5f} | {a['analytic'] / 1e9:.5f} | {'yes' if a['match'] else 'NO'} |")
    if "activation_bytes_train" in r:
        lines += ["", f"device {r['device']}",
                  f"activation memory (training forward, saved for backward, batch {r['input'][0]}): "
                  f"{r['activation_bytes_train'] / 2 ** 20:.1f} MiB",
                  f"throughput (inference, batch {r['input'][0]}): {r['samples_per_s']:.1f} samples/s, "
                  f"{r['latency_ms']:.1f} ms per batch"]
        if "inference_peak_bytes" in r:
            lines.append(f"inference peak memory: {r['inference_peak_bytes'] / 2 ** 20:.1f} MiB")
    return "\n".join(lines)


def _sizes(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-size must be S, H,W or T,H,W (ints), got {text!r}") from None
    if not 1 <= len(vals) <= 3 or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"--input-size must be S, H,W or T,H,W (positive ints), got {text!r}")
    return vals


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="structvit report", description=(
        "Parameters, GFLOPs per block type (torch.utils.flop_counter; every attention layer checked against "
        "its analytic formula), training activation memory and inference throughput on the current device."))
    p.add_argument("model", help="registered model name, e.g. structvit_tiny, structvit_b_4_1")
    p.add_argument("--input-size", type=_sizes, default=None,
                   help="S, H,W or (video) T,H,W (default: the model's input size and clip length)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--model-kwargs", default=None, help="JSON kwargs, e.g. '{\"backend\": \"keyconv\"}'")
    p.add_argument("--device", default=None, help="device to measure on (default cuda if available, else cpu)")
    p.add_argument("--no-measure", action="store_true", help="FLOPs and parameters only (no memory/throughput run)")
    p.add_argument("--time", type=float, default=1.0, help="seconds of throughput measurement (default 1)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = p.parse_args(argv)
    kwargs = {}
    if args.model_kwargs:
        try:
            kwargs = json.loads(args.model_kwargs)
        except json.JSONDecodeError as e:
            p.error(f"--model-kwargs must be a JSON object ({e})")
        if not isinstance(kwargs, dict):
            p.error("--model-kwargs must be a JSON object")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    if args.batch < 1:
        p.error("--batch must be >= 1")
    try:
        r = report(args.model, args.input_size, args.batch, args.device, not args.no_measure, kwargs,
                   min_time=args.time)
    except (ValueError, TypeError) as e:
        if settings().traceback:
            raise
        print(f"structvit report: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(r, indent=2) if args.json else format_report(r))
    return 0 if r["flops_check"] else 1


if __name__ == "__main__":
    sys.exit(main())
