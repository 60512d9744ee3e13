"""``struct_attention``: the functional structural self-attention op.

The public function validates its arguments once, at the boundary, and hands canonical
forms to :func:`struct_attention_unchecked`, which picks the backend (:mod:`.dispatch`)
and runs it (:mod:`.backends`). Modules (``structvit.nn.StructSA``) validate their
configuration at construction and call the unchecked op in forward.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Sequence

import torch

from .backends import BACKENDS
from . import autotune
from .dispatch import BACKEND_NAMES, choose_backend, fused_can_serve, unsupported
from . import checks
from .checks import check_choice
from .grid import Grid3

NORMALIZE = ("joint", "per_pattern")
PATTERN_LAYOUTS = ("channel", "head", "shared")

def check_memory_limit(memory_limit) -> None:
    """``memory_limit`` must be None or a positive int (bytes)."""
    checks.check_optional_positive_int("memory_limit", memory_limit, "bytes")


def _check_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, float64, bfloat16, float16), got {x.dtype}")


def canonical_grid(grid, n: int | None = None, name: str = "grid") -> Grid3:
    """Validate a (H, W) or (T, H, W) grid (of ``n`` positions, when given) and return it as (T, H, W)."""
    return checks.check_grid(name, grid, n)


def canonical_stride(kv_stride, rank: int) -> Grid3:
    """Validate ``kv_stride`` (an int, or one int per grid axis) and return it as (st, sh, sw)."""
    return (1,) * (3 - rank) + checks.check_stride("kv_stride", kv_stride, rank)


def pattern_layout(u: torch.Tensor, rank: int) -> str:
    """"channel" (heads, C, D, *window), "head" (heads, D, *window) or "shared" (D, *window),
    from the number of dimensions for a grid of rank 2 or 3."""
    return {rank + 3: "channel", rank + 2: "head", rank + 1: "shared"}.get(u.dim(), "")


def canonical_patterns(name: str, u, rank: int, heads: int, channels: int) -> tuple[torch.Tensor, str]:
    """Validate patterns and return (canonical (hu, cu, D, kt, kh, kw), layout).

    ``channels``: the head width this tensor's channel-wise filters act on (C for u_k,
    Cv for u_v).
    """
    _check_tensor(name, u)
    win = "kh, kw" if rank == 2 else "kt, kh, kw"
    layout = pattern_layout(u, rank)
    if not layout:
        raise ValueError(f"{name} must have shape (heads, C, D, {win}) (channel-wise), (heads, D, {win}) (per head) "
                         f"or (D, {win}) (shared) for a {rank}-D grid, got a {u.dim()}-D tensor of shape "
                         f"{tuple(u.shape)}")
    shape = {"channel": f"(heads, C, D, {win})", "head": f"(heads, D, {win})", "shared": f"(D, {win})"}[layout]
    if layout != "shared" and u.shape[0] != heads:
        raise ValueError(f"{name} of shape {tuple(u.shape)} is read as {shape} and has {u.shape[0]} heads, "
                         f"but q has {heads} heads")
    if layout == "channel" and u.shape[1] != channels:
        raise ValueError(f"{name} of shape {tuple(u.shape)} is read as {shape} and has {u.shape[1]} channels, "
                         f"but the head width it acts on is {channels}")
    window = tuple(u.shape[-rank:])
    if any(s % 2 == 0 for s in window):
        raise ValueError(f"{name} window sizes must be odd (the window is centred), got {window}: "
                         f"{name} of shape {tuple(u.shape)} is read as {shape} for a {rank}-D grid")
    if u.shape[-rank - 1] < 1:
        raise ValueError(f"{name} must have at least one pattern (D >= 1), got shape {tuple(u.shape)}")
    if layout == "shared":
        u = u.unsqueeze(0)
    if layout != "channel":
        u = u.unsqueeze(1)
    if rank == 2:
        u = u.unsqueeze(3)
    return u, layout


def _patterns_pair(q, v, u_k, u_v, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    heads = q.shape[1]
    uk, layout_k = canonical_patterns("u_k", u_k, rank, heads, q.shape[-1])
    uv, layout_v = canonical_patterns("u_v", u_v, rank, heads, v.shape[-1])
    if layout_k != layout_v:
        raise ValueError(f"u_k and u_v must use the same layout, got {layout_k!r} {tuple(u_k.shape)} and "
                         f"{layout_v!r} {tuple(u_v.shape)}")
    if uk.shape[2] != uv.shape[2]:
        raise ValueError(f"u_k and u_v must have the same number of patterns D, got {uk.shape[2]} and {uv.shape[2]}")
    return uk, uv


def _resolve(q: torch.Tensor, uk: torch.Tensor, uv: torch.Tensor, stride: Grid3, backend: str, return_weights: bool,
             dropout_p: float, memory_limit: int | None, grid: Grid3, normalize: str = "joint",
             cv: int | None = None) -> str:
    """The backend that runs: ``backend`` itself (checked that it can serve), or "auto"'s pick
    (measured on this machine where it can be, see :mod:`.autotune`; ``cv``: v's channels)."""
    channelwise = uk.shape[1] > 1 or uv.shape[1] > 1  # (a channel-wise filter over C = 1 is a dot-product one)
    strided = stride != (1, 1, 1)
    same_window = uk.shape[3:] == uv.shape[3:]
    if backend == "auto":
        b, heads, n, c = q.shape
        fused_ok = not (channelwise or strided or not same_window) and fused_can_serve(q, dropout_p)
        probe = autotune.probe_for(q, c if cv is None else cv, uk, uv, grid, stride, normalize)
        return choose_backend(b, heads, n, c, uk.shape[2], math.prod(uk.shape[3:]), channelwise=channelwise,
                              strided=strided, same_window=same_window, return_weights=return_weights,
                              element_size=q.element_size(), memory_limit=memory_limit, fused_ok=fused_ok,
                              probe=probe, measurable=dropout_p == 0 and autotune.can_measure(q))
    reason = unsupported(backend, channelwise=channelwise, strided=strided, same_window=same_window,
                         return_weights=return_weights, dropout_p=dropout_p, device_type=q.device.type)
    if reason:
        raise ValueError(f"backend={backend!r} cannot serve this call: {reason}")
    return backend


def struct_attention_unchecked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u_k: torch.Tensor,
                               u_v: torch.Tensor, grid: Grid3, stride: Grid3 = (1, 1, 1), normalize: str = "joint",
                               backend: str = "auto", scale: float | None = None, dropout_p: float = 0.0,
                               return_weights: bool = False, memory_limit: int | None = None):
    """:func:`struct_attention` on canonical, already validated arguments (no checks).

    u_k, u_v: (hu, cu, D, kt, kh, kw) (see ``structvit.ops.backends``); grid, stride:
    3-tuples. Returns ``(out, weights, backend)``: weights None unless ``return_weights``,
    backend the one that ran.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    name = _resolve(q, u_k, u_v, stride, backend, return_weights, dropout_p, memory_limit, grid, normalize,
                    v.shape[-1])
    out, weights = BACKENDS[name](q, k, v, u_k, u_v, grid, stride, normalize, float(scale), float(dropout_p),
                                  return_weights, memory_limit)
    return out, weights, name


def _match_pattern_dtype(u: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Under autocast the projections give q in the autocast dtype while parameters stay
    float32: the patterns follow q (like autocast's own casts of weights)."""
    if u.dtype != q.dtype and u.is_floating_point() and torch.is_autocast_enabled(q.device.type):
        return u.to(q.dtype)
    return u


def resolve_backend(q: torch.Tensor, u_k: torch.Tensor, grid: Sequence[int], *, u_v: torch.Tensor | None = None,
                    kv_stride=1, backend: str = "auto", return_weights: bool = False, dropout_p: float = 0.0,
                    memory_limit: int | None = None) -> str:
    """The backend :func:`struct_attention` runs for these arguments: ``backend`` itself
    (after checking that it can serve the call), or what "auto" picks for q
    (B, heads, N, C), the patterns (``u_v`` default: like ``u_k``), the grid and stride
    (shapes, dtype, device, memory limit; see :func:`structvit.ops.dispatch.choose_backend`)."""
    check_choice("backend", backend, BACKEND_NAMES)
    rank = len(grid) if isinstance(grid, Sequence) else 0
    grid3 = canonical_grid(grid, q.shape[2])
    stride = canonical_stride(kv_stride, rank)
    uk, _ = canonical_patterns("u_k", u_k, rank, q.shape[1], q.shape[-1])
    if u_v is None:
        uv = uk
    else:  # v is not given: a channel-wise u_v's width is taken as Cv
        cv = u_v.shape[1] if pattern_layout(u_v, rank) == "channel" else q.shape[-1]
        uv = canonical_patterns("u_v", u_v, rank, q.shape[1], cv)[0]
    return _resolve(q, uk, uv, stride, backend, return_weights, dropout_p, memory_limit, grid3,
                    cv=uv.shape[1] if uv.shape[1] > 1 else q.shape[-1])


def struct_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u_k: torch.Tensor, u_v: torch.Tensor,
                     grid: Sequence[int], *, kv_stride=1, normalize: str = "joint", backend: str = "auto",
                     scale: float | None = None, dropout_p: float = 0.0, return_weights: bool = False,
                     memory_limit: int | None = None):
    """Structural self-attention (StructSA) over a (T, H, W) token grid.

    For every query i, kept key/value position j' (every s-th grid position with
    ``kv_stride`` s; all positions at s = 1) and pattern d, per head::

        s[i, j', d] = scale * sum_c q_ic * sum_o u_k[c, d, o] * k_{s j' + o, c}
        A           = softmax(s)                                          (see ``normalize``)
        y_ic        = sum_{j', d} A[i, j', d] * sum_o u_v[c, d, o] * v_{s j' + o, c}

    with o over a centred window and zeros outside the grid. Channel-wise patterns (the
    paper's) have one filter per channel and pattern; the dot-product layouts share one
    filter across the channels of a head (or of all heads), which makes the score a
    D-channel convolution of q_i's correlation map, ``sum_o u_k[d, o] <q_i, k_{j+o}>``, and
    the value side a dynamic kernel ``kappa[i, j] = sum_d A[i, j, d] u_v[d]``. ConvSA is
    D = 1; plain attention is D = 1 with a 1x1 (1x1x1) window of value 1.

    Args:
        q, k: (B, heads, N, C). v: (B, heads, N, Cv).
        u_k, u_v: pattern detectors and aggregators, in one of three layouts (the number of
            dimensions decides, for a grid of rank r): (heads, C, D, *window) channel-wise
            (r + 3 dims; u_v has Cv channels), (heads, D, *window) per head (r + 2), or
            (D, *window) shared by all heads (r + 1). Windows have the grid's rank and odd
            sizes, e.g. (3, 3), (3, 3, 3), (1, 5, 5); the value window may differ from the
            key window. Both tensors use the same layout and the same D.
        grid: (H, W) or (T, H, W), with H * W (T * H * W) = N, row-major token order.
        kv_stride: key/value stride, an int or one int per grid axis: keys and values are
            taken at grid positions 0, s, 2s, ... with windows centred there (the positions
            a convolution with padding m // 2 and stride s visits), D * prod(ceil(n / s))
            keys in all.
        normalize: "joint" -- one softmax over all (j', d) pairs of a query, so a query's
            weights sum to 1 as in plain attention (default; the paper's choice); "per_pattern"
            -- a softmax over j' for each d, the D outputs summed.
        backend: "naive" (the equations literally; small inputs only), "keyconv" (depthwise
            convolutions of keys and values, then ``scaled_dot_product_attention`` over the
            D*N' keys: the paper's form, serves every case, O(N) memory with a fused
            attention kernel), "correlation" (the N x N correlation map convolved over the
            key grid, value side folded into a transposed convolution), "fused" (the folded
            form in one C++ CPU kernel, rows in chunks; a custom op that compile, export and
            the FLOP counter see), or "auto" (:func:`structvit.ops.dispatch.choose_backend`).
            "correlation" and "fused" serve the dot-product layouts at stride 1 with equal
            windows only and raise a ValueError otherwise.
        scale: score scale, default C ** -0.5.
        dropout_p: dropout on the attention weights (pass 0 at evaluation).
        return_weights: also return A, (B, heads, N, D, N'). Not with "fused".
        memory_limit: bytes of attention-sized working memory the op may hold beyond its
            inputs, outputs and their gradients. "auto" only picks a backend that fits
            (None: ``dispatch.DEFAULT_MEMORY_LIMIT``, 1 GiB), and the fused kernel sizes its
            chunks and whether it keeps the folded map for backward to it, so a small limit
            (e.g. 8 MiB) gives O(N) peak memory close to SA's at some cost in speed.

    Returns:
        (B, heads, N, Cv), or (out, A) with ``return_weights=True``.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x)
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape (B, heads, N, C), got {tuple(x.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must have shape (B, heads, N, Cv) = {tuple(q.shape[:3])} + (Cv,), got {tuple(v.shape)}")
    for name, x in (("q", q), ("v", v)):
        if x.shape[-1] < 1 or x.shape[1] < 1:
            raise ValueError(f"{name} must have at least one head and a head dim of at least 1, "
                             f"got shape {tuple(x.shape)} (B, heads, N, C)")
    rank = len(grid) if isinstance(grid, Sequence) else 0
    grid3 = canonical_grid(grid, q.shape[2])
    stride = canonical_stride(kv_stride, rank)
    u_k, u_v = _match_pattern_dtype(u_k, q), _match_pattern_dtype(u_v, q)
    uk, uv = _patterns_pair(q, v, u_k, u_v, rank)
    for name, x in (("k", k), ("v", v), ("u_k", u_k), ("u_v", u_v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {x.device}")
    check_choice("normalize", normalize, NORMALIZE)
    check_choice("backend", backend, BACKEND_NAMES)
    checks.check_positive_number("scale", scale)
    if not (isinstance(dropout_p, Real) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    check_memory_limit(memory_limit)
    out, weights, _ = struct_attention_unchecked(q, k, v, uk, uv, grid3, stride, normalize, backend, scale, dropout_p,
                                                 return_weights, memory_limit)
    return (out, weights) if return_weights else out
