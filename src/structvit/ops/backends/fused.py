"""The fused CPU backend: the folded form with each query row's work in one C++ kernel.

For every (batch, head, query row) the kernel (``csrc/fused_cpu.cpp``, built by
:mod:`..native`) convolves the row of ``S0 = q K^T`` over the key grid with the D
detectors, takes the softmax and folds the weights back with the aggregators into one
N-long row ``At[i, :]``; the GEMMs around it (``q K^T``, ``At V`` and their gradients)
stay in PyTorch. Rows go in chunks, so nothing of size D*N^2 is stored.

Dot-product pattern layouts only, at stride 1 with equal key and value windows; CPU;
float32 and float64 (other dtypes are computed in float32); no dropout, no weights.

The forward and backward passes are ``torch.library`` custom ops,
``structvit::fused_forward`` and ``structvit::fused_backward``, with fake kernels and
FLOP formulas (:mod:`..flops`), so eager mode, ``torch.compile(fullgraph=True)``,
``torch.export`` and ``FlopCounterMode`` all run and count the same kernel. Both check
every argument against the others before the kernel touches memory, and raise an error
naming the argument.

The memory plan (:func:`fused_plan`) lives here too: the chunk size and the maps kept for
backward under a working-memory limit. ``FUSED_CHUNK_ELEMENTS`` and ``FUSED_BUFFERS``: the
kernel works on chunks of (batch*head, query row) pairs of about this many
correlation-map elements, at most four such buffers alive per chunk (backward: S0, dAt,
At, dS0). Chunks split heads before rows because a single head's (R x C) x (C x N) GEMM
stays efficient down to a few hundred rows while batched GEMMs of few rows do not; the
chunk size is the fastest of the powers of two ``python -m structvit.bench op`` tried
(buffers that stay close to the caches).
"""
from __future__ import annotations

import math

import torch

from .. import checks, native
from ..buffers import CPU_BUFFERS
from ..grid import Grid3
from .common import DEFAULT_MEMORY_LIMIT, dot_product_patterns, static_shapes

FUSED_CHUNK_ELEMENTS = 1 << 20
FUSED_BUFFERS = 4


# ----------------------------------------------------------------------------- memory plan


def fused_chunk_elements(memory_limit: int | None, element_size: int = 4) -> int:
    """Chunk size (elements) for a working-memory budget in bytes (None: the default)."""
    if memory_limit is None:
        return FUSED_CHUNK_ELEMENTS
    return max(1, int(memory_limit) // (FUSED_BUFFERS * element_size))


def fused_plan(bh: int, n: int, element_size: int, memory_limit: int | None) -> tuple[int, int]:
    """(chunk elements, maps kept) of the fused kernel for B*heads = bh rows of N queries.

    Maps kept for backward, each (bh, N, N): 0 = none, 1 = the folded map At (saves one of
    the kernel's eight convolution passes), 2 = At and the correlation map S0 = q K^T (also
    saves backward's Q K^T GEMM). As many are kept as fit: with the default chunks,
    together with them in ``DEFAULT_MEMORY_LIMIT``; with a ``memory_limit``, in half of
    it, the chunks taking the rest. With none kept, memory stays O(chunk).
    """
    map_bytes = bh * n * n * element_size
    if memory_limit is None:
        buffers = FUSED_BUFFERS * min(bh * n * n, FUSED_CHUNK_ELEMENTS) * element_size
        kept = next(m for m in (2, 1, 0) if m * map_bytes + buffers <= DEFAULT_MEMORY_LIMIT or m == 0)
        return FUSED_CHUNK_ELEMENTS, kept
    kept = next(m for m in (2, 1, 0) if m * map_bytes <= memory_limit // 2)
    return fused_chunk_elements(memory_limit - kept * map_bytes, element_size), kept


def fused_working_bytes(bh: int, n: int, element_size: int, memory_limit: int | None = None) -> int:
    """Bytes the fused kernel holds under :func:`fused_plan`: its chunk buffers plus the maps kept."""
    chunk, kept = fused_plan(bh, n, element_size, memory_limit)
    return (FUSED_BUFFERS * min(bh * n * n, chunk) + kept * bh * n * n) * element_size


# ----------------------------------------------------------------------------- the custom ops


def _chunks(bh: int, heads: int, n: int, chunk_elements: int) -> list[tuple[int, int, int, int]]:
    """(bh0, bh1, r0, r1) blocks covering (BH, N) query rows, each of at most about
    ``chunk_elements`` correlation-map elements (at least one row). A block spans either
    a whole number of heads' groups (bh0 and bh1 multiples of ``heads``) or one (b, h)."""
    per_bh = n * n
    if bh * per_bh <= chunk_elements:
        return [(0, bh, 0, n)]
    if heads * per_bh <= chunk_elements:
        g = chunk_elements // (heads * per_bh) * heads
        return [(b0, min(bh, b0 + g), 0, n) for b0 in range(0, bh, g)]
    rows = max(1, min(n, chunk_elements // n))
    return [(b, b + 1, r0, min(n, r0 + rows)) for b in range(bh) for r0 in range(0, n, rows)]


def _chunk_patterns(base: dict, uk, uv, duk, duv, bh0: int, bh1: int, heads: int):
    """The kernel's view of the patterns for a chunk: per-head patterns of a single-(b, h)
    chunk are passed as that head's slice with heads = hu = 1."""
    if uk.shape[0] == 1 or bh1 - bh0 != 1 or heads == 1:
        return base, uk, uv, duk, duv
    head = bh0 % heads
    return ({**base, "heads": 1, "hu": 1}, uk[head], uv[head], (None if duk is None else duk[head]),
            (None if duv is None else duv[head]))


def _kept_map(bh: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """A (bh, N, N) map kept from forward to backward, from the buffer cache."""
    return CPU_BUFFERS.take(bh * n * n, dtype).view(bh, n, n)


class _Workspace:
    """``count`` buffers shared by all chunks, each as large as the largest chunk;
    ``get(i, b0, b1, r0, r1)`` is buffer i viewed as that chunk's contiguous (b1-b0, r1-r0, N)."""

    def __init__(self, chunks, n: int, dtype: torch.dtype, count: int):
        self.n = n
        size = max(((b1 - b0) * (r1 - r0) for b0, b1, r0, r1 in chunks), default=0) * n  # no chunks: B = 0
        self.buffers = [CPU_BUFFERS.take(size, dtype) for _ in range(count)]

    def get(self, i: int, b0: int, b1: int, r0: int, r1: int) -> torch.Tensor:
        return self.buffers[i][:(b1 - b0) * (r1 - r0) * self.n].view(b1 - b0, r1 - r0, self.n)




def _kernel_layout(u: torch.Tensor) -> torch.Tensor:
    """(hu, D, kt, kh, kw) -> the kernel's offset-major (hu, M, D)."""
    return u.flatten(2).transpose(1, 2).contiguous()


_EMPTY = (0,)  # the shape of a map that is not kept
_KERNEL_DTYPES = (torch.float32, torch.float64)


def _check_inputs(q, k, v, u_k, u_v, grid, scale: float, chunk_elements: int) -> None:
    """The checks of both ops' shared arguments, each against the others: q, k
    (B, h, N, C), v (B, h, N, Cv), u_k = u_v in shape (hu, D, kt, kh, kw) with hu 1 or h,
    odd window sizes and D >= 1, one float dtype, the CPU; grid (T, H, W) with N positions."""
    checks.check_tensor("q", q, dtypes=_KERNEL_DTYPES, device="cpu", dim=4)
    b, h, n, c = q.shape
    checks.check_tensor("k", k, like=q, shape=q.shape)
    checks.check_tensor("v", v, like=q, dim=4)
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must have shape (B, h, N, Cv) = {tuple(q.shape[:3])} + (Cv,), got {tuple(v.shape)}")
    checks.check_tensor("u_k", u_k, like=q, dim=5)
    if u_k.shape[0] not in (1, h) or u_k.shape[1] < 1:
        raise ValueError(f"u_k must have shape (hu, D, kt, kh, kw) with hu 1 or h = {h} and D >= 1, "
                         f"got {tuple(u_k.shape)}")
    checks.check_int_list("u_k's window (its last three sizes)", tuple(u_k.shape[2:]), 3, odd=True)
    checks.check_tensor("u_v", u_v, like=q, shape=u_k.shape)
    grid = checks.check_int_list("grid", grid, 3)
    if math.prod(grid) != n:
        raise ValueError(f"grid={grid} has {math.prod(grid)} positions but q has N={n}")
    checks.check_positive_number("scale", scale, allow_none=False)
    checks.check_positive_int("chunk_elements", chunk_elements)


def _kernel_args(grid, u_k: torch.Tensor, heads: int, scale: float, joint: bool) -> dict:
    """The fused kernel's geometry fields (the chunk's rows and tensor sizes are added per call)."""
    t, hh, w = grid
    return dict(T=t, H=hh, W=w, kt=u_k.shape[2], kh=u_k.shape[3], kw=u_k.shape[4], D=u_k.shape[1], heads=heads,
                hu=u_k.shape[0], joint=int(joint), scale=float(scale), threads=max(1, torch.get_num_threads()))


@torch.library.custom_op("structvit::fused_forward", mutates_args=(), device_types="cpu")
def fused_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u_k: torch.Tensor, u_v: torch.Tensor,
                  grid: list[int], joint: bool, scale: float, chunk_elements: int,
                  kept: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward pass: q, k (B, h, N, C), v (B, h, N, Cv), u_k, u_v (hu, D, kt, kh, kw), all
    float32 or float64 on the CPU; grid (T, H, W); scale > 0; chunk_elements >= 1.

    Returns out (B, h, N, Cv), the log-sum-exp of each row (B*h, N, 1 or D) and the maps
    kept for backward (``kept``: 0 none, 1 the folded map At, 2 also S0 = q K^T; each
    (B*h, N, N), or an empty tensor when not kept).
    """
    _check_inputs(q, k, v, u_k, u_v, grid, scale, chunk_elements)
    if kept not in (0, 1, 2):
        raise ValueError(f"kept must be 0, 1 or 2, got {kept!r}")
    lib = native.load()
    b, h, n, c = q.shape
    bh, d = b * h, u_k.shape[1]
    uk, uv = _kernel_layout(u_k), _kernel_layout(u_v)
    base = _kernel_args(grid, u_k, h, scale, joint)
    q2, k2, v2 = q.reshape(bh, n, c), k.reshape(bh, n, c), v.reshape(bh, n, v.shape[-1])
    out = torch.empty(bh, n, v.shape[-1], dtype=q.dtype)
    lse = torch.empty(bh, n, 1 if joint else d, dtype=q.dtype)
    fwd = lib.structvit_fused_forward_f64 if q.dtype == torch.float64 else lib.structvit_fused_forward_f32
    chunks = _chunks(bh, h, n, chunk_elements)
    work = _Workspace(chunks, n, q.dtype, 2 - kept)
    at_all = _kept_map(bh, n, q.dtype) if kept >= 1 else q.new_empty(_EMPTY)
    s0_all = _kept_map(bh, n, q.dtype) if kept == 2 else q.new_empty(_EMPTY)
    for b0, b1, r0, r1 in chunks:
        fields, uk_c, uv_c, _, _ = _chunk_patterns(base, uk, uv, None, None, b0, b1, h)
        # q K^T of the chunk's rows; the kernel applies the scale as it reads a row
        s0 = s0_all[b0:b1, r0:r1] if kept == 2 else work.get(0, b0, b1, r0, r1)
        torch.bmm(q2[b0:b1, r0:r1], k2[b0:b1].transpose(1, 2), out=s0)
        at = at_all[b0:b1, r0:r1] if kept >= 1 else work.get(1, b0, b1, r0, r1)
        lse_c = lse[b0:b1, r0:r1]
        tensors = (s0, uk_c, uv_c, at, lse_c)
        args = native.FusedArgs(**fields, BH=b1 - b0, R=r1 - r0, at_saved=0,
                                **dict(zip(("s0_len", "uk_len", "uv_len", "at_len", "lse_len"),
                                           map(native.elements, tensors))),
                                dat_len=0, rowdot_len=0, ds0_len=0, duk_len=0, duv_len=0)
        native.call(fwd, args, *tensors)
        torch.bmm(at, v2[b0:b1], out=out[b0:b1, r0:r1])
    return out.reshape(b, h, n, v.shape[-1]), lse, at_all, s0_all


@fused_forward.register_fake
def _(q, k, v, u_k, u_v, grid, joint, scale, chunk_elements, kept):
    if static_shapes(q, k, v, u_k, u_v):  # symbolic sizes (dynamic shapes) are checked by the real kernel
        _check_inputs(q, k, v, u_k, u_v, grid, scale, chunk_elements)
    b, h, n, _ = q.shape
    bh = b * h
    kept_map = (bh, n, n)
    return (q.new_empty(b, h, n, v.shape[-1]), q.new_empty(bh, n, 1 if joint else u_k.shape[1]),
            q.new_empty(kept_map if kept >= 1 else _EMPTY), q.new_empty(kept_map if kept == 2 else _EMPTY))


@torch.library.custom_op("structvit::fused_backward", mutates_args=(), device_types="cpu")
def fused_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u_k: torch.Tensor,
                   u_v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, at_kept: torch.Tensor,
                   s0_kept: torch.Tensor, grid: list[int], joint: bool, scale: float,
                   chunk_elements: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward pass of :func:`fused_forward`: (dq, dk, dv, du_k, du_v). Recomputes the
    weights from S0 and the log-sum-exp; ``at_kept`` / ``s0_kept`` are the forward's kept
    maps, or empty tensors (then the kernel recomputes At and a GEMM recomputes S0)."""
    _check_inputs(q, k, v, u_k, u_v, grid, scale, chunk_elements)
    b, h, n, c = q.shape
    bh = b * h
    checks.check_tensor("grad_out", grad_out, like=q, shape=v.shape)
    checks.check_tensor("out", out, like=q, shape=v.shape)
    checks.check_tensor("lse", lse, like=q, shape=(bh, n, 1 if joint else u_k.shape[1]), contiguous=True)
    for name, kept_map in (("at_kept", at_kept), ("s0_kept", s0_kept)):
        checks.check_tensor(name, kept_map, like=q)
        if kept_map.numel() > 0:
            checks.check_tensor(name, kept_map, shape=(bh, n, n), contiguous=True)
    if s0_kept.numel() > 0 and at_kept.numel() == 0:
        raise ValueError("s0_kept is given without at_kept: the forward keeps S0 only together with At")
    lib = native.load()
    uk, uv = _kernel_layout(u_k), _kernel_layout(u_v)
    base = _kernel_args(grid, u_k, h, scale, joint)
    q2, k2, v2 = q.reshape(bh, n, c), k.reshape(bh, n, c), v.reshape(bh, n, v.shape[-1])
    out = out.reshape(bh, n, v.shape[-1])
    dy = grad_out.reshape(bh, n, v.shape[-1]).contiguous()
    at_saved, s0_saved = at_kept.numel() > 0, s0_kept.numel() > 0
    # joint softmax: sum_{j,d} A dA = sum_j' At dAt = dY_i . Y_i (per pattern: done in the kernel)
    rowdot = (dy * out).sum(-1, keepdim=True) if joint else torch.zeros(bh, n, 1, dtype=q.dtype)
    dq, dk = torch.empty_like(q2), torch.zeros_like(k2)
    duk, duv = torch.zeros_like(uk), torch.zeros_like(uv)
    bwd = lib.structvit_fused_backward_f64 if q.dtype == torch.float64 else lib.structvit_fused_backward_f32
    chunks = _chunks(bh, h, n, chunk_elements)
    work = _Workspace(chunks, n, q.dtype, 2 + (not at_saved) + (not s0_saved))
    # The gradients of K and V are sums over query rows, X^T Y with X (R, N) from the
    # kernel: computed as (Y^T X)^T, whose GEMM reads X in its own layout (MKL's
    # transposed-X GEMM is slower at these shapes).
    if at_saved:
        dv = torch.bmm(dy.transpose(1, 2), at_kept).transpose(1, 2)
    else:
        dv = torch.zeros_like(v2)
    for b0, b1, r0, r1 in chunks:
        fields, uk_c, uv_c, duk_c, duv_c = _chunk_patterns(base, uk, uv, duk, duv, b0, b1, h)
        qc, kc = q2[b0:b1, r0:r1], k2[b0:b1]
        dat = torch.bmm(dy[b0:b1, r0:r1], v2[b0:b1].transpose(1, 2), out=work.get(0, b0, b1, r0, r1))  # dY V^T
        ds0 = work.get(1, b0, b1, r0, r1)
        if s0_saved:
            s0 = s0_kept[b0:b1, r0:r1]
        else:
            s0 = torch.bmm(qc, kc.transpose(1, 2), out=work.get(2, b0, b1, r0, r1))
        at = at_kept[b0:b1, r0:r1] if at_saved else work.get(2 + (not s0_saved), b0, b1, r0, r1)
        lse_c, rowdot_c = lse[b0:b1, r0:r1], rowdot[b0:b1, r0:r1]
        lens = {name + "_len": native.elements(t) for name, t in (
            ("s0", s0), ("dat", dat), ("lse", lse_c), ("rowdot", rowdot_c), ("uk", uk_c), ("uv", uv_c), ("at", at),
            ("ds0", ds0), ("duk", duk_c), ("duv", duv_c))}
        args = native.FusedArgs(**fields, BH=b1 - b0, R=r1 - r0, at_saved=int(at_saved), **lens)
        native.call(bwd, args, s0, dat, lse_c, rowdot_c, uk_c, uv_c, at, ds0, duk_c, duv_c)
        if not at_saved:
            dv[b0:b1] += torch.bmm(dy[b0:b1, r0:r1].transpose(1, 2), at).transpose(1, 2)
        torch.bmm(ds0, kc, out=dq[b0:b1, r0:r1])
        dk[b0:b1] += torch.bmm(qc.transpose(1, 2), ds0).transpose(1, 2)
    dq.mul_(scale)
    dk.mul_(scale)
    duk = duk.transpose(1, 2).reshape(u_k.shape)
    duv = duv.transpose(1, 2).reshape(u_v.shape)
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.contiguous().reshape(v.shape), duk, duv


@fused_backward.register_fake
def _(grad_out, q, k, v, u_k, u_v, out, lse, at_kept, s0_kept, grid, joint, scale, chunk_elements):
    if static_shapes(q, k, v, u_k, u_v):  # symbolic sizes (dynamic shapes) are checked by the real kernel
        _check_inputs(q, k, v, u_k, u_v, grid, scale, chunk_elements)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(u_k), torch.empty_like(u_v)


def _setup_context(ctx, inputs, output):
    q, k, v, u_k, u_v, grid, joint, scale, chunk_elements, kept = inputs
    out, lse, at_kept, s0_kept = output
    ctx.save_for_backward(q, k, v, u_k, u_v, out, lse, at_kept, s0_kept)
    ctx.grid, ctx.joint, ctx.scale, ctx.chunk_elements = grid, joint, scale, chunk_elements


def _backward(ctx, grad_out, grad_lse, grad_at, grad_s0):
    q, k, v, u_k, u_v, out, lse, at_kept, s0_kept = ctx.saved_tensors
    grads = fused_backward(grad_out.contiguous(), q, k, v, u_k, u_v, out, lse, at_kept, s0_kept, ctx.grid, ctx.joint,
                           ctx.scale, ctx.chunk_elements)
    return (*grads, None, None, None, None, None)


fused_forward.register_autograd(_backward, setup_context=_setup_context)


def fused(q, k, v, u_k, u_v, grid: Grid3, stride: Grid3, normalize: str, scale: float, dropout_p: float,
          return_weights: bool, memory_limit: int | None = None):
    """The folded form with the convolutions and softmax of each query row in one CPU kernel.

    Working memory at most about ``memory_limit`` bytes (default: the dispatch module's
    chunk buffers, plus the folded map At and the correlation map S0, B*h*N^2 elements
    each, kept for backward as far as they fit in ``DEFAULT_MEMORY_LIMIT``); see
    :func:`fused_plan`. With a small limit: O(N) memory beyond the inputs plus
    the chunks.
    """
    uk5, uv5 = dot_product_patterns(u_k), dot_product_patterns(u_v)
    dtype = q.dtype
    if dtype not in (torch.float32, torch.float64):
        q, k, v, uk5, uv5 = (t.float() for t in (q, k, v, uk5, uv5))
    q, k, v, uk5, uv5 = (t.contiguous() for t in (q, k, v, uk5, uv5))
    b, h, n, _ = q.shape
    chunk, kept = fused_plan(b * h, n, q.element_size(), memory_limit)
    # nothing to keep for a backward that will not run (inference: grad mode off, or no
    # input that requires grad)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, uk5, uv5))):
        kept = 0
    out = fused_forward(q, k, v, uk5, uv5, list(grid), normalize == "joint", scale, chunk, kept)[0]
    return out.to(dtype), None
