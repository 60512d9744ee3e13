"""The three exact forms of structural self-attention.

Every backend takes canonical, already validated arguments:

- q: (B, h, N, C), k: (B, h, N, C), v: (B, h, N, Cv), all on one device and dtype;
- u_k, u_v: (h or 1, D, kt, kh, kw), odd window sizes;
- grid: (T, H, W) with T * H * W = N;
- normalize: "joint" or "per_pattern"; scale: float; dropout_p: float.

and returns ``(out, weights)``: out (B, h, N, Cv) and, when asked for, the attention
weights (B, h, N, D, N) (``None`` otherwise).

See ../../../README.md and DESIGN.md section 1 for the equations.
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from . import native
from .buffers import CPU_BUFFERS
from .grid import Grid3, depthwise_pattern_weight, grid_conv, neighbour_index


def _normalise(scores: torch.Tensor, normalize: str) -> torch.Tensor:
    """Softmax of scores (B, h, N, D, N): jointly over (d, j), or over j for each d."""
    if normalize == "joint":
        b, h, n, d, m = scores.shape
        return torch.softmax(scores.reshape(b, h, n, d * m), dim=-1).reshape(b, h, n, d, m)
    return torch.softmax(scores, dim=-1)


def _dropout(a: torch.Tensor, p: float) -> torch.Tensor:
    return F.dropout(a, p=p, training=True) if p > 0 else a


def naive(q, k, v, u_k, u_v, grid: Grid3, normalize: str, scale: float, dropout_p: float, return_weights: bool):
    """The equations of DESIGN.md literally, with gathered local contexts.

    Memory O(B h N^2 M): small inputs only; it is the reference the other forms are
    tested against (together with a loop-level implementation in the tests).
    """
    b, h, n, c = q.shape
    window = tuple(u_k.shape[2:])
    index, valid = neighbour_index(grid, window, q.device)  # (N, M)
    mask = valid.to(q.dtype)[..., None]
    k_ctx = k[:, :, index] * mask  # (B, h, N, M, C): K_j = [k_{j+o}]
    v_ctx = v[:, :, index] * mask  # (B, h, N, M, Cv)
    uk = u_k.flatten(2).expand(h, -1, -1)  # (h, D, M)
    uv = u_v.flatten(2).expand(h, -1, -1)
    corr = torch.einsum("bhic,bhjmc->bhijm", q, k_ctx) * scale  # <q_i, k_{j+o}>
    scores = torch.einsum("bhijm,hdm->bhidj", corr, uk)  # s[i, j, d]
    weights = _normalise(scores, normalize)
    kappa = torch.einsum("bhidj,hdm->bhijm", _dropout(weights, dropout_p), uv)  # dynamic kernels
    out = torch.einsum("bhijm,bhjmc->bhic", kappa, v_ctx)
    return out, (weights if return_weights else None)


def pattern_conv(x: torch.Tensor, u: torch.Tensor, grid: Grid3) -> torch.Tensor:
    """Convolve a token map with each of the D patterns: ``x^d = sum_o u[d, o] shift_o(x)``.

    One grouped convolution over all heads and channels.

    Args:
        x: (B, h, N, C); u: (h or 1, D, kt, kh, kw).

    Returns:
        (B, h, D, N, C).
    """
    b, h, n, c = x.shape
    d = u.shape[1]
    w = depthwise_pattern_weight(u, h, c)  # (h * C * D, 1, k...)
    y = grid_conv(x.transpose(-1, -2).reshape(b, h * c, n), w, grid, groups=h * c)  # (B, h*C*D, N)
    return y.reshape(b, h, c, d, n).permute(0, 1, 3, 4, 2)


def correlation(q, k, v, u_k, u_v, grid: Grid3, normalize: str, scale: float, dropout_p: float,
                return_weights: bool, value_side: str = "auto"):
    """Forms 2 and 4: convolve the N x N correlation map over the key grid.

    Scores: one grouped convolution whose channels are the (head, query) rows of
    ``q k^T``, D outputs each. Values: either the transposed convolution of the
    D-channel attention back to one N x N map (``value_side="folded"``, form 4,
    cost N^2 M D) or attention over the D pattern-convolved value maps
    (``value_side="shifted"``, form 2, cost D N^2 Cv); "auto" takes the cheaper.
    """
    b, h, n, c = q.shape
    d = u_k.shape[1]
    cv = v.shape[-1]
    corr = torch.matmul(q * scale, k.transpose(-1, -2))  # (B, h, N, N): C_i(j)
    wk = depthwise_pattern_weight(u_k, h, n)  # (h * N * D, 1, k...)
    scores = grid_conv(corr.reshape(b, h * n, n), wk, grid, groups=h * n).reshape(b, h, n, d, n)
    weights = _normalise(scores, normalize)
    attn = _dropout(weights, dropout_p)
    m = u_v[0, 0].numel()
    if value_side == "auto":
        value_side = "folded" if m * d <= d * cv else "shifted"
    if value_side == "folded":
        wv = depthwise_pattern_weight(u_v, h, n)  # (h * N * D, 1, k...): transposed-conv weight
        folded = grid_conv(attn.reshape(b, h * n * d, n), wv, grid, groups=h * n, transposed=True)  # (B, h*N, N)
        out = torch.matmul(folded.reshape(b, h, n, n), v)
    elif value_side == "shifted":
        v_pat = pattern_conv(v, u_v, grid).reshape(b, h, d * n, cv)  # [V^1 ... V^D]
        out = torch.matmul(attn.reshape(b, h, n, d * n), v_pat)
    else:
        raise ValueError(f"value_side must be 'auto', 'folded' or 'shifted', got {value_side!r}")
    return out, (weights if return_weights else None)


def keyconv(q, k, v, u_k, u_v, grid: Grid3, normalize: str, scale: float, dropout_p: float, return_weights: bool):
    """Form 3: attention of Q over the D pattern-convolved key maps.

    ``s[i, j, d] = scale * <q_i, K^d_j>`` with ``K^d = sum_o u_k[d, o] shift_o(K)``, so
    StructSA is ordinary attention over D * N keys [K^1 ... K^D] and values
    [V^1 ... V^D] (joint), or the sum over d of D attentions (per_pattern). Runs on
    ``scaled_dot_product_attention`` (fused, O(N) memory where a fused kernel exists),
    which never materialises the weights: ``return_weights`` is not supported.
    """
    if return_weights:
        raise ValueError("return_weights=True is not supported by backend='keyconv' (the fused attention "
                         "kernel never materialises the weights); use backend='correlation' or 'naive'")
    b, h, n, c = q.shape
    d = u_k.shape[1]
    # Contiguous copies: the fused CPU/GPU kernels need unit stride in the channel dim
    # (otherwise SDPA silently falls back to the O(D N^2)-memory math path).
    k_pat = pattern_conv(k, u_k, grid).contiguous()  # (B, h, D, N, C)
    v_pat = pattern_conv(v, u_v, grid).contiguous()  # (B, h, D, N, Cv)
    if normalize == "joint":
        out = F.scaled_dot_product_attention(q, k_pat.reshape(b, h, d * n, c), v_pat.reshape(b, h, d * n, -1),
                                             dropout_p=dropout_p, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q.unsqueeze(2).expand(b, h, d, n, c), k_pat, v_pat,
                                             dropout_p=dropout_p, scale=scale).sum(2)
    return out, None


BACKENDS = {"naive": naive, "correlation": correlation, "keyconv": keyconv}


# ----------------------------------------------------------------------------- fused (CPU)

# The kernel works on chunks of (batch*head, query row) pairs of about this many
# correlation-map elements, so the op holds O(chunk) instead of O(B heads N^2) memory:
# whole heads when they fit, else single heads in blocks of rows. Each chunk keeps at most
# four such buffers alive (backward: S0, dAt, At, dS0). Smaller chunks save memory but the
# GEMMs around the kernel get less efficient (measured on CPU: a 10 x 66 x 64 x 1568 batched
# GEMM takes as long as a 10 x 256 x 64 x 1568 one), which is why chunks split heads before
# rows: a single head's (R x 64) x (64 x N) GEMM stays efficient down to a few hundred rows.
# 1M elements (4 MiB in float32, 668 rows of the 8x14x14 video grid) measured 1-4% faster
# than 4M there at batch 2 (2 cores; the same within noise at batch 1): the buffers stay
# closer to the caches.
FUSED_CHUNK_ELEMENTS = 1 << 20
FUSED_BUFFERS = 4


# "auto" only picks a backend whose attention-sized working memory (beyond q, k, v, the
# output and their gradients) stays under this many bytes per call, unless told otherwise
# with ``memory_limit``: the correlation form's D*N^2 buffers, the key-convolution form's
# D-times convolved keys and values, the fused kernel's chunk buffers (which shrink to fit)
# and the maps it keeps for backward as far as they fit (fused_plan).
DEFAULT_MEMORY_LIMIT = 1 << 30


def fused_chunk_elements(memory_limit: int | None, element_size: int = 4) -> int:
    """Chunk size (elements) for a working-memory budget in bytes (None: the default)."""
    if memory_limit is None:
        return FUSED_CHUNK_ELEMENTS
    return max(1, int(memory_limit) // (FUSED_BUFFERS * element_size))


def fused_plan(bh: int, n: int, element_size: int, memory_limit: int | None) -> tuple[int, int]:
    """(chunk elements, maps kept) of the fused kernel for B*heads = bh rows of N queries.

    Maps kept for backward, each (bh, N, N): 0 = none, 1 = the folded map At (saves one of
    the kernel's eight convolution passes), 2 = At and the correlation map S0 = q K^T (also
    saves backward's Q K^T GEMM: measured 2-7% of fwd+bwd for the video
    benchmark case, 11% for the image one). As many are kept as fit: with
    the default chunks, together with them in ``DEFAULT_MEMORY_LIMIT``; with a
    ``memory_limit``, in half of it, the chunks taking the rest. With none kept, memory
    stays O(chunk).
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


def _ptr(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


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


def _chunk_patterns(dims: torch.Tensor, uk, uv, duk, duv, bh0: int, bh1: int, heads: int):
    """The kernel's view of the patterns for a chunk: per-head patterns of a single-(b, h)
    chunk are passed as that head's slice with heads = hu = 1."""
    if uk.shape[0] == 1 or bh1 - bh0 != 1 or heads == 1:
        return dims, uk, uv, duk, duv
    head = bh0 % heads
    one = dims.clone()
    one[7:9] = 1
    return one, uk[head], uv[head], (None if duk is None else duk[head]), (None if duv is None else duv[head])


class _FoldedCPU(torch.autograd.Function):
    """Folded form with the key-grid convolution, softmax and transposed convolution of
    each query row fused in one CPU kernel (``csrc/folded_cpu.cpp``); the GEMMs stay in
    PyTorch. Nothing of size D*N^2 is stored: backward recomputes the weights from S0 and
    the per-row log-sum-exp. ``kept`` (see :func:`fused_plan`): 1 keeps the folded map At
    (B*h, N, N) for backward (else the kernel recomputes it), 2 also S0 = q K^T (else
    backward recomputes it with a GEMM). Chunks share one workspace; the workspace and the
    kept maps come from :data:`buffers.CPU_BUFFERS`, so the next call reuses them instead
    of page-faulting fresh memory."""

    @staticmethod
    def forward(ctx, q, k, v, u_k, u_v, grid, joint, scale, chunk_elements, kept):
        lib = native.load()
        b, h, n, c = q.shape
        bh, d = b * h, u_k.shape[1]
        hu = u_k.shape[0]
        uk = u_k.flatten(2).transpose(1, 2).contiguous()  # (hu, M, D), offset-major
        uv = u_v.flatten(2).transpose(1, 2).contiguous()
        dims = torch.tensor(list(grid) + list(u_k.shape[2:]) + [d, h, hu], dtype=torch.int64)
        q2, k2, v2 = q.reshape(bh, n, c), k.reshape(bh, n, c), v.reshape(bh, n, -1)
        out = torch.empty(bh, n, v.shape[-1], dtype=q.dtype)
        lse = torch.empty(bh, n, 1 if joint else d, dtype=q.dtype)
        fwd = lib.structsa_folded_forward_f64 if q.dtype == torch.float64 else lib.structsa_folded_forward_f32
        threads = torch.get_num_threads()
        chunks = _chunks(bh, h, n, chunk_elements)
        work = _Workspace(chunks, n, q.dtype, 2 - kept)
        at_all = _kept_map(bh, n, q.dtype) if kept >= 1 else None
        s0_all = _kept_map(bh, n, q.dtype) if kept == 2 else None
        for b0, b1, r0, r1 in chunks:
            dims_c, uk_c, uv_c, _, _ = _chunk_patterns(dims, uk, uv, None, None, b0, b1, h)
            # q K^T of the chunk's rows; the kernel applies the scale as it reads a row
            s0 = s0_all[b0:b1, r0:r1] if kept == 2 else work.get(0, b0, b1, r0, r1)
            torch.bmm(q2[b0:b1, r0:r1], k2[b0:b1].transpose(1, 2), out=s0)
            at = at_all[b0:b1, r0:r1] if kept >= 1 else work.get(1, b0, b1, r0, r1)
            fwd(_ptr(s0), _ptr(uk_c), _ptr(uv_c), _ptr(at), _ptr(lse[b0:b1, r0:r1]), b1 - b0, r1 - r0, _ptr(dims_c),
                scale, int(joint), threads)
            torch.bmm(at, v2[b0:b1], out=out[b0:b1, r0:r1])
        ctx.save_for_backward(q, k, v, uk, uv, out, lse, dims, at_all, s0_all)
        ctx.joint, ctx.scale, ctx.u_shape, ctx.chunk_elements = joint, scale, u_k.shape, chunk_elements
        return out.reshape(b, h, n, -1)

    @staticmethod
    def backward(ctx, grad_out):
        lib = native.load()
        q, k, v, uk, uv, out, lse, dims, at_all, s0_all = ctx.saved_tensors
        b, h, n, c = q.shape
        bh = b * h
        scale, joint = ctx.scale, ctx.joint
        q2, k2, v2 = q.reshape(bh, n, c), k.reshape(bh, n, c), v.reshape(bh, n, -1)
        dy = grad_out.reshape(bh, n, -1).contiguous()
        # joint softmax: sum_{j,d} A dA = sum_j' At dAt = dY_i . Y_i (per pattern: done in the kernel)
        rowdot = (dy * out).sum(-1, keepdim=True) if joint else torch.zeros(bh, n, 1, dtype=q.dtype)
        dq, dk = torch.empty_like(q2), torch.zeros_like(k2)
        duk, duv = torch.zeros_like(uk), torch.zeros_like(uv)
        bwd = lib.structsa_folded_backward_f64 if q.dtype == torch.float64 else lib.structsa_folded_backward_f32
        threads = torch.get_num_threads()
        chunks = _chunks(bh, h, n, ctx.chunk_elements)
        at_saved = at_all is not None
        work = _Workspace(chunks, n, q.dtype, 2 + (not at_saved) + (s0_all is None))
        # The gradients of K and V are sums over query rows, X^T Y with X (R, N) from the
        # kernel: computed as (Y^T X)^T, whose GEMM reads X in its own layout (measured 2x
        # faster than MKL's transposed-X GEMM at 1568 x 1568 x 64).
        if at_saved:
            dv = torch.bmm(dy.transpose(1, 2), at_all).transpose(1, 2)
        else:
            dv = torch.zeros_like(v2)
        for b0, b1, r0, r1 in chunks:
            dims_c, uk_c, uv_c, duk_c, duv_c = _chunk_patterns(dims, uk, uv, duk, duv, b0, b1, h)
            qc, kc = q2[b0:b1, r0:r1], k2[b0:b1]
            dat = torch.bmm(dy[b0:b1, r0:r1], v2[b0:b1].transpose(1, 2), out=work.get(0, b0, b1, r0, r1))  # dY V^T
            ds0 = work.get(1, b0, b1, r0, r1)
            if s0_all is not None:
                s0 = s0_all[b0:b1, r0:r1]
            else:
                s0 = torch.bmm(qc, kc.transpose(1, 2), out=work.get(2, b0, b1, r0, r1))
            at = at_all[b0:b1, r0:r1] if at_saved else work.get(2 + (s0_all is None), b0, b1, r0, r1)
            bwd(_ptr(s0), _ptr(dat), _ptr(lse[b0:b1, r0:r1]), _ptr(rowdot[b0:b1, r0:r1]), _ptr(uk_c), _ptr(uv_c),
                _ptr(at), _ptr(ds0), _ptr(duk_c), _ptr(duv_c), b1 - b0, r1 - r0, _ptr(dims_c), scale, int(joint),
                int(at_saved), threads)
            if not at_saved:
                dv[b0:b1] += torch.bmm(dy[b0:b1, r0:r1].transpose(1, 2), at).transpose(1, 2)
            torch.bmm(ds0, kc, out=dq[b0:b1, r0:r1])
            dk[b0:b1] += torch.bmm(qc.transpose(1, 2), ds0).transpose(1, 2)
        dq.mul_(scale)
        dk.mul_(scale)
        shape = ctx.u_shape
        duk = duk.transpose(1, 2).reshape(shape)
        duv = duv.transpose(1, 2).reshape(shape)
        return (dq.reshape(q.shape), dk.reshape(k.shape), dv.contiguous().reshape(v.shape), duk, duv, None, None, None,
                None, None)


def _kept_map(bh: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """A (bh, N, N) map kept from forward to backward, from the buffer cache."""
    return CPU_BUFFERS.take(bh * n * n, dtype).view(bh, n, n)


class _Workspace:
    """``count`` buffers shared by all chunks, each as large as the largest chunk;
    ``get(i, b0, b1, r0, r1)`` is buffer i viewed as that chunk's contiguous (b1-b0, r1-r0, N)."""

    def __init__(self, chunks, n: int, dtype: torch.dtype, count: int):
        self.n = n
        size = max((b1 - b0) * (r1 - r0) for b0, b1, r0, r1 in chunks) * n
        self.buffers = [CPU_BUFFERS.take(size, dtype) for _ in range(count)]

    def get(self, i: int, b0: int, b1: int, r0: int, r1: int) -> torch.Tensor:
        return self.buffers[i][:(b1 - b0) * (r1 - r0) * self.n].view(b1 - b0, r1 - r0, self.n)


def fused(q, k, v, u_k, u_v, grid: Grid3, normalize: str, scale: float, dropout_p: float, return_weights: bool,
          memory_limit: int | None = None):
    """The folded form (form 4) with each query row's convolution, softmax and transposed
    convolution fused in one CPU kernel, rows in chunks. Working memory at most about
    ``memory_limit`` bytes (default: ``FUSED_BUFFERS`` chunk buffers of
    ``FUSED_CHUNK_ELEMENTS``, plus the folded map At and the correlation map S0, B*h*N^2
    elements each, kept for backward as far as they fit in ``DEFAULT_MEMORY_LIMIT``); see
    :func:`fused_plan`. With a small limit: O(N) memory beyond the inputs plus the chunks.

    CPU only; float32 and float64 (bfloat16/float16 are computed in float32). No
    attention dropout and no weights (use "correlation" for those).
    """
    if return_weights:
        raise ValueError("return_weights=True is not supported by backend='fused' (the kernel never stores the "
                         "weights); use backend='correlation' or 'naive'")
    if dropout_p > 0:
        raise ValueError("dropout_p > 0 is not supported by backend='fused'; use 'correlation' or 'keyconv'")
    if q.device.type != "cpu":
        raise ValueError(f"backend='fused' runs on the CPU only, got tensors on {q.device}")
    dtype = q.dtype
    if dtype not in (torch.float32, torch.float64):
        q, k, v, u_k, u_v = (t.float() for t in (q, k, v, u_k, u_v))
    q, k, v, u_k, u_v = (t.contiguous() for t in (q, k, v, u_k, u_v))
    b, h, n, _ = q.shape
    chunk, kept = fused_plan(b * h, n, q.element_size(), memory_limit)
    # nothing to keep for a backward that will not run (inference: grad mode off, or no
    # input that requires grad)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, u_k, u_v))):
        kept = 0
    out = _FoldedCPU.apply(q, k, v, u_k, u_v, grid, normalize == "joint", scale, chunk, kept)
    return out.to(dtype), None


BACKENDS["fused"] = fused
