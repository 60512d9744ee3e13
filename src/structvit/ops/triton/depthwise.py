"""The backbone's depthwise convolutions (odd window, stride 1, "same" zero padding) as Triton kernels.

``y[b, c, p] = bias[c] + sum_o w[c, o] x[b, c, p + o - k // 2]`` over 2-D (B, C, H, W) or 3-D
(B, C, T, H, W) maps, read and written with their own strides: a channels-last map is
processed in channels-last memory (channels contiguous, the fast order for this kernel) and
comes out channels-last; a default-layout map stays in the default layout.

- the input gradient is the same convolution of the output gradient with the window flipped
  (stride 1, symmetric padding), so the forward kernel serves it;
- the weight gradient ``gw[c, o] = sum_{b, p} gy[b, c, p] x[b, c, p + o - k // 2]`` is a
  reduction over B * positions: each program sums one slice for one (offset, channel block)
  into a partial sum, a second pass adds the partials (no atomics);
- the bias gradient is PyTorch's sum of the output gradient.

Inputs in float32, bfloat16 or float16 accumulate in float32; float64 in float64. Both passes
are ``torch.library`` custom ops (``structvit::triton_depthwise_conv_forward`` and
``_backward``) with fake kernels, autograd and FLOP formulas counted as PyTorch counts the
convolution they replace (:mod:`..flops`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ..flops import register_depthwise_formulas
from .launch import accumulator_type, device_guard, runner

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@triton.jit
def depthwise_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, sxb, sxc, sxt, sxh, sxw, syb, syc, syt, syh, syw, C, T, H, W,
                      KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    # program: batch item x block of positions x block of channels
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < T * H * W
    c_ok = c < C
    w_ = p % W
    h_ = (p // W) % H
    t_ = p // (W * H)
    x_base = x_ptr + b * sxb + c.to(tl.int64)[None, :] * sxc
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    for a in tl.static_range(KT):
        ti = t_ + (a - KT // 2)
        t_ok = p_ok & (ti >= 0) & (ti < T)
        for e in tl.static_range(KH):
            yi = h_ + (e - KH // 2)
            y_ok = t_ok & (yi >= 0) & (yi < H)
            for f in tl.static_range(KW):
                xi = w_ + (f - KW // 2)
                ok = y_ok & (xi >= 0) & (xi < W)
                offset = ti.to(tl.int64) * sxt + yi.to(tl.int64) * sxh + xi.to(tl.int64) * sxw
                xv = tl.load(x_base + offset[:, None], mask=ok[:, None] & c_ok[None, :], other=0.0)
                wv = tl.load(w_ptr + c * (KT * KH * KW) + ((a * KH + e) * KW + f), mask=c_ok, other=0.0)
                acc += xv.to(ACC) * wv.to(ACC)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(ACC)[None, :]
    out = (y_ptr + b * syb + c.to(tl.int64)[None, :] * syc
           + (t_.to(tl.int64) * syt + h_.to(tl.int64) * syh + w_.to(tl.int64) * syw)[:, None])
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


@triton.jit
def depthwise_grad_weight_kernel(x_ptr, gy_ptr, parts_ptr, sxb, sxc, sxt, sxh, sxw, sgb, sgc, sgt, sgh, sgw,
                                  C, T, H, W, rows_total, rows_per_part,
                                  KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                                  BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    # program: window offset x slice of the B * positions rows x block of channels
    M: tl.constexpr = KT * KH * KW
    o = tl.program_id(0)
    part = tl.program_id(1).to(tl.int64)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    a = o // (KH * KW)
    e = (o // KW) % KH
    f = o % KW
    n = T * H * W
    start = part * rows_per_part
    end = tl.minimum(start + rows_per_part, rows_total)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    for r0 in range(start, end, BLOCK_P):
        r = r0 + tl.arange(0, BLOCK_P)  # row = b * positions + p
        b = r // n
        p = r % n
        w_ = p % W
        h_ = (p // W) % H
        t_ = p // (W * H)
        ti = t_ + a - KT // 2
        yi = h_ + e - KH // 2
        xi = w_ + f - KW // 2
        ok = (r < end) & (ti >= 0) & (ti < T) & (yi >= 0) & (yi < H) & (xi >= 0) & (xi < W)
        m = ok[:, None] & c_ok[None, :]
        xv = tl.load(x_ptr + (b * sxb + ti * sxt + yi * sxh + xi * sxw)[:, None] + c[None, :] * sxc, mask=m,
                     other=0.0)
        gv = tl.load(gy_ptr + (b * sgb + t_ * sgt + h_ * sgh + w_ * sgw)[:, None] + c[None, :] * sgc, mask=m,
                     other=0.0)
        acc += xv.to(ACC) * gv.to(ACC)
    tl.store(parts_ptr + (part * C + c) * M + o, tl.sum(acc, axis=0), mask=c_ok)


def _as_3d(t: torch.Tensor) -> tuple[int, ...]:
    """(B, C, T, H, W) sizes and strides of a 4-D or 5-D map (a 2-D map is T = 1, stride 0)."""
    if t.dim() == 4:
        b, c, h, w = t.shape
        sb, sc, sh, sw = t.stride()
        return (b, c, 1, h, w), (sb, sc, 0, sh, sw)
    return tuple(t.shape), tuple(t.stride())


def _window(weight: torch.Tensor) -> tuple[int, int, int]:
    k = tuple(weight.shape[2:])
    return (1, *k) if len(k) == 2 else k


def _check(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    if x.dim() not in (4, 5):
        raise ValueError(f"x must be (B, C, H, W) or (B, C, T, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"x must be one of {DTYPES}, got {x.dtype}")
    c = x.shape[1]
    if (weight.dim() != x.dim() or weight.shape[:2] != (c, 1)
            or any(k % 2 == 0 for k in weight.shape[2:])):
        raise ValueError(f"weight must be a depthwise ({c}, 1, k...) weight of x's rank with odd window sizes, "
                         f"got shape {tuple(weight.shape)}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight must have x's dtype and device ({x.dtype}, {x.device}), got "
                         f"({weight.dtype}, {weight.device})")
    if bias is not None and (bias.shape != (c,) or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"bias must be ({c},) in x's dtype and device, got {tuple(bias.shape)} {bias.dtype} "
                         f"{bias.device}")


def _blocks(c: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C): up to 64 channels per program, a 4096-value accumulator."""
    block_c = max(16, min(64, triton.next_power_of_2(c)))
    return 4096 // block_c, block_c


def depthwise_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x (B, C, [T,] H, W), weight (C, 1, [kt,] kh, kw), bias (C,) or None -> y like x
    (same shape, dtype and memory format)."""
    _check(x, weight, bias)
    y = torch.empty_like(x)
    if y.numel() == 0:
        return y
    (b, c, t, h, w), xs = _as_3d(x)
    _, ys = _as_3d(y)
    block_p, block_c = _blocks(c)
    launch = (b, triton.cdiv(t * h * w, block_p), triton.cdiv(c, block_c))
    weight = weight.contiguous()
    with device_guard(x):
        runner(depthwise_kernel, x.device)[launch](
            x, weight, weight if bias is None else bias.contiguous(), y, *xs, *ys, c, t, h, w, *_window(weight),
            HAS_BIAS=bias is not None, BLOCK_P=block_p, BLOCK_C=block_c, ACC=accumulator_type(x.dtype))
    return y


def depthwise_grad_weight(grad_y: torch.Tensor, x: torch.Tensor, window: tuple[int, int, int]) -> torch.Tensor:
    """grad_y and x (B, C, [T,] H, W) -> grad weight (C, M) in x's dtype (M = kt kh kw)."""
    (b, c, t, h, w), xs = _as_3d(x)
    _, gs = _as_3d(grad_y)
    m = math.prod(window)
    rows = b * t * h * w
    if rows == 0:
        return torch.zeros(c, m, dtype=x.dtype, device=x.device)
    block_p, block_c = _blocks(c)
    c_blocks = triton.cdiv(c, block_c)
    target = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 2
    parts = max(1, min(triton.cdiv(rows, block_p), triton.cdiv(target, m * c_blocks)))
    rows_per_part = triton.cdiv(triton.cdiv(rows, parts), block_p) * block_p
    parts = triton.cdiv(rows, rows_per_part)
    partial = torch.empty(parts, c, m, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                          device=x.device)
    with device_guard(x):
        runner(depthwise_grad_weight_kernel, x.device)[(m, parts, c_blocks)](
            x, grad_y, partial, *xs, *gs, c, t, h, w, rows, rows_per_part, *window,
            BLOCK_P=block_p, BLOCK_C=block_c, ACC=accumulator_type(x.dtype))
    return partial.sum(0).to(x.dtype)


@torch.library.custom_op("structvit::triton_depthwise_conv_forward", mutates_args=(), device_types=("cuda", "cpu"))
def depthwise_conv_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Depthwise convolution, stride 1, padding k // 2: x (B, C, [T,] H, W), weight
    (C, 1, [kt,] kh, kw), bias (C,) or None -> (B, C, [T,] H, W) in x's memory format.
    (On CPU tensors the kernel runs interpreted: for tests.)"""
    return depthwise_forward(x, weight, bias)


@depthwise_conv_forward.register_fake
def _(x, weight, bias):
    return torch.empty_like(x)


@torch.library.custom_op("structvit::triton_depthwise_conv_backward", mutates_args=(), device_types=("cuda", "cpu"))
def depthwise_conv_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, need_x: bool,
                            need_w: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad x like x, grad weight like weight); one that is not needed comes back as zeros."""
    grad_y = grad_y if grad_y.dtype == x.dtype else grad_y.to(x.dtype)
    if need_x:
        flipped = weight.flip(list(range(2, weight.dim())))  # the transposed convolution at stride 1
        gx = depthwise_forward(grad_y, flipped, None)
    else:
        gx = torch.zeros_like(x)
    if need_w:
        gw = depthwise_grad_weight(grad_y, x, _window(weight)).reshape(weight.shape)
    else:
        gw = torch.zeros_like(weight)
    return gx, gw


@depthwise_conv_backward.register_fake
def _(grad_y, x, weight, need_x, need_w):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad
    gx, gw = depthwise_conv_backward(grad_y, x, weight, need_x, need_w)
    gb = grad_y.sum([0, *range(2, grad_y.dim())]) if ctx.has_bias and need_b else None
    return (gx if need_x else None), (gw if need_w else None), gb


depthwise_conv_forward.register_autograd(_backward, setup_context=_setup_context)
register_depthwise_formulas(torch.ops.structvit.triton_depthwise_conv_forward,
                            torch.ops.structvit.triton_depthwise_conv_backward)
