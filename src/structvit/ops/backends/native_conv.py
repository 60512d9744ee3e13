"""keyconv's pattern convolutions as one CPU kernel (``csrc/pattern_conv_cpu.cpp``).

``pattern_keys_native(x, u, grid, stride)`` computes what :func:`.keyconv.pattern_keys`
computes, ``x^d_{j'c} = sum_o u[h, c, d, o] x_{s j' + o, c}``, straight into the
(B, h, D * N', C) layout ``scaled_dot_product_attention`` reads: no layout copy before or
after, and ``x`` may be a strided view (a slice of a qkv projection) as long as its
channels are contiguous. The forward and backward passes are ``torch.library`` custom ops,
``structvit::pattern_conv_forward`` and ``structvit::pattern_conv_backward``, with fake
kernels and FLOP formulas (:mod:`..flops`), so ``torch.compile``, ``torch.export`` and
``FlopCounterMode`` see the same kernel as eager mode.

CPU, float32 and float64, any pattern layout (the dot-product ones are expanded over the
channels), any window and stride. Built and loaded with the fused kernel (:mod:`..native`);
where that is unavailable keyconv uses PyTorch's convolutions instead.
"""
from __future__ import annotations

import math

import torch

from ... import config
from .. import native
from ..native import pointer as _ptr
from ..dispatch import native_available
from ..grid import Grid3, strided_grid


def _dims(x: torch.Tensor, w: torch.Tensor, grid, window, stride, groups: int = 1) -> torch.Tensor:
    b, h, _, c = x.shape
    return torch.tensor([b, h, c, w.shape[1], *grid, *window, *stride, groups], dtype=torch.int64)


def _x_strides(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(x.stride()[:3], dtype=torch.int64)


def _suffix(t: torch.Tensor) -> str:
    return "f64" if t.dtype == torch.float64 else "f32"


def weight_groups(batch: int, heads: int, patterns: int, threads: int) -> int:
    """Batch groups of the weight gradient: enough (heads, pattern, group) tasks for about
    four per thread; each group's partial sum is a (heads, D, M, C) slice."""
    return max(1, min(batch, -(-4 * threads // max(1, heads * patterns))))


@torch.library.custom_op("structvit::pattern_conv_forward", mutates_args=(), device_types="cpu")
def pattern_conv_forward(x: torch.Tensor, w: torch.Tensor, grid: list[int], window: list[int],
                         stride: list[int]) -> torch.Tensor:
    """x (B, h, N, C) float32/float64 with unit stride in C; w (h, D, M, C) contiguous,
    offset-major over ``window`` (kt, kh, kw); grid (T, H, W); stride (st, sh, sw).
    Returns (B, h, D * N', C) contiguous, pattern-major."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    w = w.contiguous()
    b, h, _, c = x.shape
    d = w.shape[1]
    n_out = math.prod(strided_grid(tuple(grid), tuple(stride)))
    y = torch.empty(b, h, d * n_out, c, dtype=x.dtype)
    if y.numel():
        fn = getattr(native.load(), f"structsa_pattern_conv_forward_{_suffix(x)}")
        xs, dims = _x_strides(x), _dims(x, w, grid, window, stride)  # kept alive through the call
        fn(_ptr(x), _ptr(xs), _ptr(w), _ptr(y), _ptr(dims), torch.get_num_threads())
    return y


@pattern_conv_forward.register_fake
def _(x, w, grid, window, stride):
    b, h, _, c = x.shape
    return x.new_empty(b, h, w.shape[1] * math.prod(strided_grid(tuple(grid), tuple(stride))), c)


@torch.library.custom_op("structvit::pattern_conv_backward", mutates_args=(), device_types="cpu")
def pattern_conv_backward(grad_y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, grid: list[int], window: list[int],
                          stride: list[int], need_x: bool, need_w: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`pattern_conv_forward`: (grad x (B, h, N, C) contiguous, grad w
    (h, D, M, C)); one that is not needed comes back as zeros, not computed."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    gy = grad_y.contiguous()  # SDPA's backward gives (B, D N', h, C) memory: read in place it measured slower
    w = w.contiguous()
    b, h, n, c = x.shape
    lib = native.load()
    threads = torch.get_num_threads()
    gs = _x_strides(gy)  # every tensor passed by pointer stays referenced through the call
    if need_x and x.numel():
        gx = torch.empty(b, h, n, c, dtype=x.dtype)  # the kernel writes every element
        dims = _dims(x, w, grid, window, stride)
        getattr(lib, f"structsa_pattern_conv_grad_input_{_suffix(x)}")(_ptr(gy), _ptr(gs), _ptr(w), _ptr(gx),
                                                                        _ptr(dims), threads)
    else:
        gx = torch.zeros(b, h, n, c, dtype=x.dtype)
    if need_w and x.numel():
        groups = weight_groups(b, h, w.shape[1], threads)
        parts = torch.empty(groups, *w.shape, dtype=x.dtype)
        xs, dims = _x_strides(x), _dims(x, w, grid, window, stride, groups)
        getattr(lib, f"structsa_pattern_conv_grad_weight_{_suffix(x)}")(_ptr(x), _ptr(xs), _ptr(gy), _ptr(gs),
                                                                         _ptr(parts), _ptr(dims), threads)
        gw = parts.sum(0)
    else:
        gw = torch.zeros_like(w)
    return gx, gw


@pattern_conv_backward.register_fake
def _(grad_y, x, w, grid, window, stride, need_x, need_w):
    return x.new_empty(x.shape), torch.empty_like(w)


def _setup_context(ctx, inputs, output):
    x, w, grid, window, stride = inputs
    ctx.save_for_backward(x, w)
    ctx.geometry = (grid, window, stride)


def _backward(ctx, grad_y):
    x, w = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[:2]
    gx, gw = pattern_conv_backward(grad_y, x, w, *ctx.geometry, need_x, need_w)
    return (gx if need_x else None), (gw if need_w else None), None, None, None


pattern_conv_forward.register_autograd(_backward, setup_context=_setup_context)


def kernel_weight(u: torch.Tensor, heads: int, channels: int) -> torch.Tensor:
    """Patterns (hu, cu, D, kt, kh, kw) as the kernel's (heads, D, M, C), offset-major;
    per-head and shared layouts are expanded over heads and channels (their gradients sum
    back through the expand)."""
    full = u.expand(heads, channels, *u.shape[2:])
    return full.flatten(3).permute(0, 2, 3, 1).contiguous()


def serves(x: torch.Tensor) -> bool:
    """Whether the kernel computes ``x``'s pattern convolution here: CPU, float32 or
    float64, the native library available and not switched off
    (``config.set_native_conv``, ``STRUCTVIT_NATIVE_CONV``), and not an ONNX export (ONNX
    has no such operator; the PyTorch layouts export)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or not config.settings().native_conv:
        return False
    return not torch.onnx.is_in_onnx_export() and native_available()


def pattern_keys_native(x: torch.Tensor, u: torch.Tensor, grid: Grid3, stride: Grid3 = (1, 1, 1)) -> torch.Tensor:
    """:func:`.keyconv.pattern_keys` with the kernel: x (B, h, N, C), u (hu, cu, D, kt, kh, kw)
    -> (B, h, D * N', C)."""
    w = kernel_weight(u.to(x.dtype), x.shape[1], x.shape[3])
    return pattern_conv_forward(x, w, list(grid), list(u.shape[3:]), list(stride))
