"""``struct_attention``: the functional structural self-attention op and its dispatcher."""
from __future__ import annotations

import math
from numbers import Real
from typing import Sequence

import torch

from . import native
from .backends import BACKENDS, DEFAULT_MEMORY_LIMIT, fused_working_bytes

NORMALIZE = ("joint", "per_pattern")
BACKEND_NAMES = ("auto",) + tuple(BACKENDS)

# Cost, in multiply-add equivalents, of one element of the D*N^2 score/weight maps of the
# correlation form passing through its memory-bound steps (key-grid convolution,
# softmax and their backward). Calibrated with `python -m structvit.bench op` on a
# 2-core CPU (torch 2.14): there the correlation form lost to the key-convolution form
# on SDPA at both benchmark shapes although it has fewer multiply-adds.
MEMORY_BOUND_WEIGHT = 100

# The fused CPU kernel's cost in units of plain attention's: measured
# ``fused / SA ~ 1 + FUSED_KERNEL_WEIGHT * M * D / C`` for fwd+bwd (`python -m structvit.bench
# op --cases image image7 video video155 video555`, 2-core CPU, torch 2.14: 2.9x, 2.9x, 6.0x,
# 5.8x and 23.4x SA, weights 1.4-1.7), against ``keyconv / SA ~ KEYCONV_WEIGHT * D``
# (measured 1.3-1.7 per pattern at N = 1568, more at small N; the lower end is taken).
FUSED_KERNEL_WEIGHT = 1.6
KEYCONV_WEIGHT = 1.2


def check_memory_limit(memory_limit) -> None:
    """``memory_limit`` must be None or a positive int (bytes)."""
    if memory_limit is not None and (not isinstance(memory_limit, int) or isinstance(memory_limit, bool)
                                     or memory_limit <= 0):
        raise ValueError(f"memory_limit must be a positive int (bytes) or None, got {memory_limit!r}")


def _check_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, float64, bfloat16, float16), got {x.dtype}")


def canonical_grid(grid, n: int | None = None, name: str = "grid") -> tuple[int, int, int]:
    """Validate a (H, W) or (T, H, W) grid and return it as (T, H, W)."""
    if isinstance(grid, torch.Size):
        grid = tuple(grid)
    if not isinstance(grid, Sequence) or len(grid) not in (2, 3):
        raise ValueError(f"{name} must be (H, W) or (T, H, W), got {grid!r}")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in grid):
        raise ValueError(f"{name} sizes must be positive ints, got {tuple(grid)!r}")
    if n is not None and math.prod(grid) != n:
        raise ValueError(f"{name}={tuple(grid)} has {math.prod(grid)} positions but the inputs have N={n} tokens")
    return (1,) * (3 - len(grid)) + tuple(grid)


def _canonical_patterns(name: str, u: torch.Tensor, rank: int, heads: int) -> torch.Tensor:
    """(heads, D, *window) or (D, *window) -> (heads or 1, D, kt, kh, kw)."""
    _check_tensor(name, u)
    win = "kh, kw" if rank == 2 else "kt, kh, kw"
    if u.dim() not in (rank + 1, rank + 2):
        raise ValueError(f"{name} must have shape (heads, D, {win}) or (D, {win}) for a {rank}-D grid, "
                         f"got a {u.dim()}-D tensor of shape {tuple(u.shape)}")
    if u.dim() == rank + 2 and u.shape[0] != heads:
        raise ValueError(f"{name} has {u.shape[0]} heads (shape {tuple(u.shape)}) but q has {heads} heads")
    window = u.shape[-rank:]
    if any(s % 2 == 0 for s in window):
        layout = f"(heads, D, {win})" if u.dim() == rank + 2 else f"(D, {win})"
        raise ValueError(f"{name} window sizes must be odd (the window is centred), got {tuple(window)}: "
                         f"{name} of shape {tuple(u.shape)} is read as {layout} for a {rank}-D grid")
    if u.shape[-rank - 1] < 1:
        raise ValueError(f"{name} must have at least one pattern (D >= 1), got shape {tuple(u.shape)}")
    if u.dim() == rank + 1:
        u = u.unsqueeze(0)
    if rank == 2:
        u = u.unsqueeze(2)
    return u


def estimate_cost(b: int, heads: int, n: int, c: int, d: int, m: int, *, element_size: int = 4,
                  cv: int | None = None) -> dict[str, dict[str, float]]:
    """Multiply-adds and the attention-sized bytes each backend keeps (DESIGN.md section 1).

    Returns ``{backend: {"macs": ..., "bytes": ...}}`` for one forward pass.
    """
    cv = c if cv is None else cv
    bh = b * heads
    corr_value = min(n * n * m * d + n * n * cv, d * n * n * cv + n * m * d * cv)
    return {
        # q k^T, the D-output key-grid convolution, then the (folded or shifted) value side;
        # about three D*N^2 buffers (scores, weights, their folded/gradient forms) are held.
        "correlation": {"macs": bh * (n * n * c + n * n * m * d + corr_value), "bytes": 3 * bh * d * n * n * element_size},
        # attention of N queries over D*N convolved keys; only O(N) state with a fused kernel.
        "keyconv": {"macs": bh * (d * n * n * (c + cv) + n * m * d * (c + cv)), "bytes": 2 * bh * d * n * (c + cv) * element_size},
        "naive": {"macs": bh * (n * n * m * c + n * n * m * d * 2 + n * n * m * cv), "bytes": 2 * bh * n * n * m * element_size},
        # the folded form's FLOPs; rows in chunks and recomputed in backward: the chunk
        # buffers plus At and S0 (bh, N, N each) as far as kept (fused_plan, default limit)
        "fused": {"macs": bh * (n * n * (c + cv) + 2 * n * n * m * d), "bytes": fused_working_bytes(bh, n, element_size)},
    }


def choose_backend(b: int, heads: int, n: int, c: int, d: int, m: int, *, return_weights: bool = False,
                   element_size: int = 4, memory_limit: int | None = None, fused_ok: bool = False) -> str:
    """The backend "auto" picks (DESIGN.md section 1, calibrated by ``structvit bench op``).

    - ``return_weights`` needs the weights: "correlation".
    - Only backends whose working memory (``estimate_cost(...)[name]["bytes"]``) fits in
      ``memory_limit`` bytes (default ``DEFAULT_MEMORY_LIMIT``, 1 GiB) are candidates. The
      fused kernel always fits: its chunks shrink to the limit (down to one query row).
      If nothing fits (no fused kernel: CUDA, dropout, tracing), the backend with the
      least memory.
    - ``fused_ok`` (a CPU call the fused kernel can serve: built here, no dropout, not
      being traced or exported): "fused" when it is the only candidate or when its
      measured cost model, ``1 + FUSED_KERNEL_WEIGHT * M * D / C`` times SA, beats
      keyconv's ``KEYCONV_WEIGHT * D`` (on a 2-core CPU, D = 8, C = 64: fused for 3x3,
      3x3x3 and 1x5x5 windows, keyconv for 5x5x5).
    - Otherwise the cheaper of correlation and keyconv by multiply-adds, where each
      element of the correlation form's D*N^2 maps costs ``MEMORY_BOUND_WEIGHT`` more
      (memory-bound convolution and softmax passes). "naive" is never picked.
    """
    if return_weights:
        return "correlation"
    limit = DEFAULT_MEMORY_LIMIT if memory_limit is None else memory_limit
    cost = estimate_cost(b, heads, n, c, d, m, element_size=element_size)
    fits = {name for name in ("correlation", "keyconv") if cost[name]["bytes"] <= limit}
    if fused_ok and ("keyconv" not in fits or 1 + FUSED_KERNEL_WEIGHT * m * d / c < KEYCONV_WEIGHT * d):
        return "fused"
    if not fits:
        return min(("keyconv", "correlation"), key=lambda name: cost[name]["bytes"])
    if len(fits) == 1:
        return fits.pop()
    corr = cost["correlation"]["macs"] + MEMORY_BOUND_WEIGHT * b * heads * d * n * n
    return "correlation" if corr < cost["keyconv"]["macs"] else "keyconv"


def _fused_can_serve(q: torch.Tensor, dropout_p: float) -> bool:
    """Whether "auto" may use the fused CPU kernel for this call."""
    if q.device.type != "cpu" or dropout_p > 0:
        return False
    # a ctypes call cannot be traced, scripted, compiled or exported
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return False
    if torch.onnx.is_in_onnx_export():
        return False
    # nor seen by a dispatch mode (FLOP counting, fake or meta tensors): its work would be
    # invisible there, so "auto" picks a backend made of PyTorch ops instead
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    if _get_current_dispatch_mode() is not None:
        return False
    return native.available()


def _auto_backend(q: torch.Tensor, uk: torch.Tensor, return_weights: bool, dropout_p: float,
                  memory_limit: int | None) -> str:
    """What "auto" runs for q (B, heads, N, C) and canonical patterns uk (hu, D, kt, kh, kw)."""
    b, heads, n, c = q.shape
    return choose_backend(b, heads, n, c, uk.shape[1], uk[0, 0].numel(), return_weights=return_weights,
                          element_size=q.element_size(), memory_limit=memory_limit,
                          fused_ok=_fused_can_serve(q, dropout_p))


def resolve_backend(q: torch.Tensor, u_k: torch.Tensor, grid: Sequence[int], *, backend: str = "auto",
                    return_weights: bool = False, dropout_p: float = 0.0, memory_limit: int | None = None) -> str:
    """The backend ``struct_attention`` runs for these arguments: ``backend`` itself, or
    what "auto" picks for q (B, heads, N, C), u_k (heads, D, *window) or (D, *window) and
    the grid (shapes, dtype, device, memory limit; see :func:`choose_backend`)."""
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    if backend != "auto":
        return backend
    rank = len(grid) if isinstance(grid, Sequence) else 0
    canonical_grid(grid, q.shape[2])  # validated like struct_attention does
    uk = _canonical_patterns("u_k", u_k, rank, q.shape[1])
    return _auto_backend(q, uk, return_weights, dropout_p, memory_limit)


def struct_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u_k: torch.Tensor, u_v: torch.Tensor,
                     grid: Sequence[int], *, normalize: str = "joint", backend: str = "auto",
                     scale: float | None = None, dropout_p: float = 0.0, return_weights: bool = False,
                     memory_limit: int | None = None):
    """Structural self-attention (StructSA) over a (T, H, W) token grid.

    For every query i, key position j and pattern d (per head)::

        s[i, j, d] = scale * sum_o u_k[d, o] * <q_i, k_{j+o}>        (key-grid conv of q_i's correlation map)
        A          = softmax(s)                                        (see ``normalize``)
        kappa[i,j] = sum_d A[i, j, d] * u_v[d]                         (dynamic kernel, one weight per offset)
        y_i        = sum_j sum_o kappa[i, j, o] * v_{j+o}

    with o over a centred window and zeros outside the grid. ConvSA is D = 1; plain
    attention is D = 1 with a 1x1 (1x1x1) window of value 1.

    Args:
        q, k: (B, heads, N, C). v: (B, heads, N, Cv).
        u_k, u_v: pattern detectors and aggregators, (heads, D, *window) per head or
            (D, *window) shared by all heads; window has the grid's rank and odd sizes,
            e.g. (3, 3), (3, 3, 3), (1, 5, 5). Both must have the same shape.
        grid: (H, W) or (T, H, W), with H * W (T * H * W) = N, row-major token order.
        normalize: "joint" -- one softmax over all (j, d) pairs of a query, so a query's
            weights sum to 1 as in plain attention (default); "per_pattern" -- a softmax
            over j for each d, the D outputs summed. The paper writes sigma_jD, which
            admits both readings.
        backend: "naive" (the equations literally; O(N^2 M) memory, small inputs only),
            "correlation" (forms 2/4: the N x N correlation map convolved over the key
            grid, value side folded into a transposed convolution when M <= Cv),
            "keyconv" (form 3: convolve keys and values with the patterns, then
            ``scaled_dot_product_attention`` over D*N keys; O(N) memory with a fused
            kernel; cannot return weights), "fused" (form 4 with each query row's
            convolution, softmax and transposed convolution in one C++ CPU kernel, rows in
            chunks; keeps the (B, heads, N, N) folded map for backward when it fits in the
            memory limit, else O(N) memory; CPU only, no dropout, no weights), or "auto" (see
            :func:`choose_backend`).
        scale: score scale, default C ** -0.5.
        dropout_p: dropout on the attention weights (pass 0 at evaluation).
        return_weights: also return A, (B, heads, N, D, N). Not with "keyconv".
        memory_limit: bytes of attention-sized working memory the op may hold beyond its
            inputs, outputs and their gradients. "auto" only picks a backend that fits
            (None: ``DEFAULT_MEMORY_LIMIT``, 1 GiB; see :func:`choose_backend`), and the
            fused kernel sizes its chunks and whether it keeps the folded map for backward
            to it (see ``backends.fused_plan``), so a small limit (e.g. 8 MiB) gives O(N)
            peak memory close to SA's at some cost in speed.

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
    b, heads, n, c = q.shape
    rank = len(grid) if isinstance(grid, Sequence) else 0
    grid3 = canonical_grid(grid, n)
    uk = _canonical_patterns("u_k", u_k, rank, heads)
    uv = _canonical_patterns("u_v", u_v, rank, heads)
    if u_k.shape != u_v.shape:
        raise ValueError(f"u_k and u_v must have the same shape (heads, D, window), got {tuple(u_k.shape)} and {tuple(u_v.shape)}")
    for name, x in (("k", k), ("v", v), ("u_k", u_k), ("u_v", u_v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {x.device}")
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    if scale is None:
        scale = c ** -0.5
    elif not isinstance(scale, Real) or isinstance(scale, bool) or not scale > 0:
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")
    if not (isinstance(dropout_p, Real) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    check_memory_limit(memory_limit)
    if backend == "auto":
        backend = _auto_backend(q, uk, return_weights, dropout_p, memory_limit)
    extra = {"memory_limit": memory_limit} if backend == "fused" else {}
    out, weights = BACKENDS[backend](q, k, v, uk, uv, grid3, normalize, float(scale), float(dropout_p), return_weights,
                                     **extra)
    return (out, weights) if return_weights else out
