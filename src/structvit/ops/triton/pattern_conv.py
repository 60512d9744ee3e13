"""keyconv's pattern convolutions as Triton kernels (the GPU counterpart of :mod:`..backends.native_conv`).

The same contract as the CPU kernel:

- forward     ``y[b, h, d, j', c] = sum_o w[h, d, o, c] x[b, h, s j' + o - k // 2, c]``
- grad input  ``gx[b, h, j, c] = sum_{d, o, j' : s j' + o - k // 2 = j} gy[b, h, d, j', c] w[h, d, o, c]``
- grad weight ``gw[h, d, o, c] = sum_{b, j'} gy[b, h, d, j', c] x[b, h, s j' + o - k // 2, c]``

(per axis of the (T, H, W) grid: a window of k with zero padding k // 2 and a stride of s.)
``x`` (B, h, N, C) is read in place with any strides over (B, h, N) as long as its channels
are contiguous (k and v are views of one qkv projection); ``w`` is (h, D, M, C), offset-major
over the window (kt, kh, kw), the per-head and shared pattern layouts expanded over heads and
channels (:func:`kernel_weight`); ``y`` is written straight into the (B, h, D * N', C) layout
``scaled_dot_product_attention`` reads.

The input gradient is a gather over the (output position, offset) pairs that read each input
position (the transposed convolution), so every element is written by one program, no
atomics. The weight gradient is a reduction over B * N' rows: each program sums one slice of
rows for one (head, pattern, offset, channel block) and writes a partial sum; a second pass
adds the partials. Inputs in float32, bfloat16 or float16 accumulate in float32; float64 in
float64.

Both passes are ``torch.library`` custom ops (``structvit::triton_pattern_conv_forward`` and
``structvit::triton_pattern_conv_backward``) with fake kernels, autograd and FLOP formulas
(:mod:`..flops`), so ``torch.compile(fullgraph=True)``, ``torch.export`` and
``FlopCounterMode`` see them.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..backends.common import register_pattern_conv_autograd
from ..backends.native_conv import kernel_weight
from ..flops import register_pattern_conv_formulas
from ..grid import Grid3, strided_grid
from .launch import accumulator_type, device_guard, runner

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@triton.jit
def pattern_conv_forward_kernel(x_ptr, w_ptr, y_ptr, sxb, sxh, sxn, heads, D, C, T, H, W, To, Ho, Wo,
                    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, ST: tl.constexpr, SH: tl.constexpr,
                    SW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    # program (b, h, d) x block of output positions x block of channels
    pid_bhd = tl.program_id(0).to(tl.int64)
    d = pid_bhd % D
    bh = pid_bhd // D
    h = bh % heads
    b = bh // heads
    n_out = To * Ho * Wo
    j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    j_ok = j < n_out
    c_ok = c < C
    wo = j % Wo
    ho = (j // Wo) % Ho
    to = j // (Wo * Ho)
    x_base = x_ptr + b * sxb + h * sxh
    w_base = w_ptr + (h * D + d) * (KT * KH * KW) * C
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=ACC)
    for a in tl.static_range(KT):
        ti = to * ST + (a - KT // 2)
        t_ok = (ti >= 0) & (ti < T)
        for e in tl.static_range(KH):
            yi = ho * SH + (e - KH // 2)
            y_ok = t_ok & (yi >= 0) & (yi < H)
            for f in tl.static_range(KW):
                xi = wo * SW + (f - KW // 2)
                ok = j_ok & y_ok & (xi >= 0) & (xi < W)
                pos = ((ti * H + yi) * W + xi).to(tl.int64)
                xv = tl.load(x_base + pos[:, None] * sxn + c[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0)
                wv = tl.load(w_base + ((a * KH + e) * KW + f) * C + c, mask=c_ok, other=0.0)
                acc += xv.to(ACC) * wv.to(ACC)[None, :]
    rows = (bh * D + d) * n_out + j
    tl.store(y_ptr + rows[:, None] * C + c[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=j_ok[:, None] & c_ok[None, :])


@triton.jit
def pattern_conv_grad_input_kernel(gy_ptr, w_ptr, gx_ptr, sgb, sgh, sgn, heads, D, C, T, H, W, To, Ho, Wo,
                       KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, ST: tl.constexpr, SH: tl.constexpr,
                       SW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    # program (b, h) x block of input positions x block of channels: gathers every
    # (pattern, offset, output position) that read the position
    bh = tl.program_id(0).to(tl.int64)
    h = bh % heads
    b = bh // heads
    n_in = T * H * W
    n_out = To * Ho * Wo
    i = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    i_ok = i < n_in
    c_ok = c < C
    wi = i % W
    hi = (i // W) % H
    ti = i // (W * H)
    gy_base = gy_ptr + b * sgb + h * sgh
    w_base = w_ptr + h * D * (KT * KH * KW) * C
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=ACC)
    for a in tl.static_range(KT):
        num_t = ti + (KT // 2 - a)  # = to * ST for the output position to that reads ti at offset a
        to = num_t // ST
        t_ok = (num_t >= 0) & (num_t % ST == 0) & (to < To)
        for e in tl.static_range(KH):
            num_h = hi + (KH // 2 - e)
            ho = num_h // SH
            h_ok = t_ok & (num_h >= 0) & (num_h % SH == 0) & (ho < Ho)
            for f in tl.static_range(KW):
                num_w = wi + (KW // 2 - f)
                wo = num_w // SW
                ok = i_ok & h_ok & (num_w >= 0) & (num_w % SW == 0) & (wo < Wo)
                j = ((to * Ho + ho) * Wo + wo).to(tl.int64)
                o = (a * KH + e) * KW + f
                for d in range(0, D):
                    gv = tl.load(gy_base + (d * n_out + j)[:, None] * sgn + c[None, :],
                                 mask=ok[:, None] & c_ok[None, :], other=0.0)
                    wv = tl.load(w_base + (d * (KT * KH * KW) + o) * C + c, mask=c_ok, other=0.0)
                    acc += gv.to(ACC) * wv.to(ACC)[None, :]
    tl.store(gx_ptr + (bh * n_in + i)[:, None] * C + c[None, :], acc.to(gx_ptr.dtype.element_ty),
             mask=i_ok[:, None] & c_ok[None, :])


@triton.jit
def pattern_conv_grad_weight_kernel(x_ptr, gy_ptr, parts_ptr, sxb, sxh, sxn, sgb, sgh, sgn, heads, D, C, T, H, W, To, Ho, Wo,
                        rows_total, rows_per_part,
                        KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, ST: tl.constexpr, SH: tl.constexpr,
                        SW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    # program (h, d, offset) x slice of the B * N' rows x block of channels: one partial sum
    M: tl.constexpr = KT * KH * KW
    pid = tl.program_id(0).to(tl.int64)
    o = pid % M
    hd = pid // M
    d = hd % D
    h = hd // D
    part = tl.program_id(1).to(tl.int64)
    a = o // (KH * KW)
    e = (o // KW) % KH
    f = o % KW
    n_out = To * Ho * Wo
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    start = part * rows_per_part
    end = tl.minimum(start + rows_per_part, rows_total)
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=ACC)
    for r0 in range(start, end, BLOCK_N):
        r = r0 + tl.arange(0, BLOCK_N)  # row = b * N' + j'
        b = r // n_out
        j = r % n_out
        wo = j % Wo
        ho = (j // Wo) % Ho
        to = j // (Wo * Ho)
        ti = to * ST + a - KT // 2
        yi = ho * SH + e - KH // 2
        xi = wo * SW + f - KW // 2
        ok = (r < end) & (ti >= 0) & (ti < T) & (yi >= 0) & (yi < H) & (xi >= 0) & (xi < W)
        pos = (ti * H + yi) * W + xi
        m = ok[:, None] & c_ok[None, :]
        xv = tl.load(x_ptr + (b * sxb + h * sxh + pos * sxn)[:, None] + c[None, :], mask=m, other=0.0)
        gv = tl.load(gy_ptr + (b * sgb + h * sgh + (d * n_out + j) * sgn)[:, None] + c[None, :], mask=m, other=0.0)
        acc += xv.to(ACC) * gv.to(ACC)
    tl.store(parts_ptr + (((part * heads + h) * D + d) * M + o) * C + c, tl.sum(acc, axis=0), mask=c_ok)


def _check(x: torch.Tensor, w: torch.Tensor, grid, window, stride) -> None:
    """Argument checks of the ops (keyconv passes valid arguments; a direct call gets a clear error)."""
    if x.dim() != 4:
        raise ValueError(f"x must be (B, heads, N, C), got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"x must be one of {DTYPES}, got {x.dtype}")
    if len(grid) != 3 or len(window) != 3 or len(stride) != 3:
        raise ValueError(f"grid, window and stride must be 3 ints each, got {grid}, {window}, {stride}")
    if any(k < 1 or k % 2 == 0 for k in window) or any(s < 1 for s in stride) or any(n < 1 for n in grid):
        raise ValueError(f"window must be odd positive ints, stride and grid positive ints, got window={window}, "
                         f"stride={stride}, grid={grid}")
    b, h, n, c = x.shape
    if math.prod(grid) != n:
        raise ValueError(f"x has N={n} tokens but grid {tuple(grid)} has {math.prod(grid)}")
    if w.dim() != 4 or w.shape[0] != h or w.shape[2] != math.prod(window) or w.shape[3] != c:
        raise ValueError(f"w must be (heads={h}, D, M={math.prod(window)}, C={c}), got shape {tuple(w.shape)}")
    if w.dtype != x.dtype or w.device != x.device:
        raise ValueError(f"w must have x's dtype and device ({x.dtype}, {x.device}), got ({w.dtype}, {w.device})")


def _blocks(c: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_C): channels in blocks of up to 128 (a head's channels are usually 32-64),
    positions so that a program's accumulator holds 4096 values."""
    block_c = max(16, min(128, triton.next_power_of_2(c)))
    return max(16, 4096 // block_c), block_c


def _unit_channels(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def conv_forward(x: torch.Tensor, w: torch.Tensor, grid, window, stride) -> torch.Tensor:
    """x (B, h, N, C), w (h, D, M, C) -> y (B, h, D * N', C) contiguous."""
    _check(x, w, grid, window, stride)
    x, w = _unit_channels(x), w.contiguous()
    b, h, _, c = x.shape
    d = w.shape[1]
    out_grid = strided_grid(tuple(grid), tuple(stride))
    n_out = math.prod(out_grid)
    y = torch.empty(b, h, d * n_out, c, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    block_n, block_c = _blocks(c)
    launch = (b * h * d, triton.cdiv(n_out, block_n), triton.cdiv(c, block_c))
    with device_guard(x):
        runner(pattern_conv_forward_kernel, x.device)[launch](
            x, w, y, x.stride(0), x.stride(1), x.stride(2), h, d, c, *grid, *out_grid, *window, *stride,
            BLOCK_N=block_n, BLOCK_C=block_c, ACC=accumulator_type(x.dtype))
    return y


def conv_grad_input(grad_y: torch.Tensor, w: torch.Tensor, grid, window, stride) -> torch.Tensor:
    """grad_y (B, h, D * N', C), w (h, D, M, C) -> grad x (B, h, N, C) contiguous."""
    gy, w = _unit_channels(grad_y), w.contiguous()
    b, h, _, c = gy.shape
    d = w.shape[1]
    n = math.prod(grid)
    gx = torch.empty(b, h, n, c, dtype=gy.dtype, device=gy.device)
    if gx.numel() == 0:
        return gx
    block_n, block_c = _blocks(c)
    launch = (b * h, triton.cdiv(n, block_n), triton.cdiv(c, block_c))
    with device_guard(gy):
        runner(pattern_conv_grad_input_kernel, gy.device)[launch](
            gy, w, gx, gy.stride(0), gy.stride(1), gy.stride(2), h, d, c, *grid,
            *strided_grid(tuple(grid), tuple(stride)), *window, *stride,
            BLOCK_N=block_n, BLOCK_C=block_c, ACC=accumulator_type(gy.dtype))
    return gx


def weight_parts(rows: int, programs: int, block_n: int, device: torch.device) -> int:
    """How many partial sums the weight gradient's B * N' rows are split into: enough programs to
    fill the GPU about four times over (two on the CPU, so that the interpreted tests
    exercise the second pass), at least one block of rows each."""
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    return max(1, min(triton.cdiv(rows, block_n), triton.cdiv(target, programs)))


def conv_grad_weight(grad_y: torch.Tensor, x: torch.Tensor, w_shape, grid, window, stride) -> torch.Tensor:
    """grad_y (B, h, D * N', C), x (B, h, N, C) -> grad w (h, D, M, C) in x's dtype."""
    gy, x = _unit_channels(grad_y), _unit_channels(x)
    b, h, _, c = x.shape
    d, m = w_shape[1], w_shape[2]
    out_grid = strided_grid(tuple(grid), tuple(stride))
    rows = b * math.prod(out_grid)
    if rows == 0:
        return torch.zeros(w_shape, dtype=x.dtype, device=x.device)
    block_n, block_c = _blocks(c)
    block_n = min(block_n, 64)
    c_blocks = triton.cdiv(c, block_c)
    parts = weight_parts(rows, h * d * m * c_blocks, block_n, x.device)
    rows_per_part = triton.cdiv(triton.cdiv(rows, parts), block_n) * block_n
    parts = triton.cdiv(rows, rows_per_part)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    partial = torch.empty(parts, h, d, m, c, dtype=acc_dtype, device=x.device)
    with device_guard(x):
        runner(pattern_conv_grad_weight_kernel, x.device)[(h * d * m, parts, c_blocks)](
            x, gy, partial, x.stride(0), x.stride(1), x.stride(2), gy.stride(0), gy.stride(1), gy.stride(2),
            h, d, c, *grid, *out_grid, rows, rows_per_part, *window, *stride,
            BLOCK_N=block_n, BLOCK_C=block_c, ACC=accumulator_type(x.dtype))
    return partial.sum(0).to(x.dtype)


@torch.library.custom_op("structvit::triton_pattern_conv_forward", mutates_args=(), device_types=("cuda", "cpu"))
def pattern_conv_forward(x: torch.Tensor, w: torch.Tensor, grid: list[int], window: list[int],
                         stride: list[int]) -> torch.Tensor:
    """x (B, h, N, C) with unit stride in C; w (h, D, M, C), offset-major over ``window``
    (kt, kh, kw); grid (T, H, W); stride (st, sh, sw). Returns (B, h, D * N', C) contiguous,
    pattern-major. (On CPU tensors the kernel runs interpreted: for tests.)"""
    return conv_forward(x, w, grid, window, stride)


@pattern_conv_forward.register_fake
def _(x, w, grid, window, stride):
    b, h, _, c = x.shape
    return x.new_empty(b, h, w.shape[1] * math.prod(strided_grid(tuple(grid), tuple(stride))), c)


@torch.library.custom_op("structvit::triton_pattern_conv_backward", mutates_args=(), device_types=("cuda", "cpu"))
def pattern_conv_backward(grad_y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, grid: list[int], window: list[int],
                          stride: list[int], need_x: bool, need_w: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`pattern_conv_forward`: (grad x (B, h, N, C), grad w (h, D, M, C));
    one that is not needed comes back as zeros, not computed."""
    gx = conv_grad_input(grad_y, w, grid, window, stride) if need_x else torch.zeros(x.shape, dtype=x.dtype,
                                                                                    device=x.device)
    gw = conv_grad_weight(grad_y, x, w.shape, grid, window, stride) if need_w else torch.zeros_like(w)
    return gx, gw


@pattern_conv_backward.register_fake
def _(grad_y, x, w, grid, window, stride, need_x, need_w):
    return x.new_empty(x.shape), torch.empty_like(w)


register_pattern_conv_autograd(pattern_conv_forward, pattern_conv_backward)
register_pattern_conv_formulas(torch.ops.structvit.triton_pattern_conv_forward,
                               torch.ops.structvit.triton_pattern_conv_backward)


def pattern_keys_triton(x: torch.Tensor, u: torch.Tensor, grid: Grid3, stride: Grid3 = (1, 1, 1)) -> torch.Tensor:
    """:func:`..backends.keyconv.pattern_keys` with the Triton kernels: x (B, h, N, C),
    u (hu, cu, D, kt, kh, kw) -> (B, h, D * N', C)."""
    w = kernel_weight(u.to(x.dtype), x.shape[1], x.shape[3])
    return pattern_conv_forward(x, w, list(grid), list(u.shape[3:]), list(stride))
