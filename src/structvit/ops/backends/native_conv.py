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
where that is unavailable keyconv uses PyTorch's convolutions instead. Both ops check
every argument against the others before the kernel touches memory, and raise an error
naming the argument.
"""
from __future__ import annotations

import math

import torch

from ... import config
from .. import checks, native
from ..grid import Grid3, strided_grid
from .common import register_pattern_conv_autograd, static_shapes

_KERNEL_DTYPES = (torch.float32, torch.float64)


def _check_geometry(x, w, grid, window, stride) -> int:
    """The checks of both ops' shared arguments, each against the others: x (B, h, N, C)
    float32/float64 on the CPU, w (h, D, M, C) of x's dtype, grid (T, H, W) with N
    positions, window (kt, kh, kw) odd with M positions, stride (st, sh, sw) >= 1.
    Returns N' (the positions kept with the stride)."""
    checks.check_tensor("x", x, dtypes=_KERNEL_DTYPES, device="cpu", dim=4)
    checks.check_tensor("w", w, like=x, dim=4)
    b, h, n, c = x.shape
    if w.shape[0] != h or w.shape[3] != c:
        raise ValueError(f"w must have shape (h, D, M, C) with h = {h} and C = {c} (x's), got {tuple(w.shape)}")
    grid = checks.check_int_list("grid", grid, 3)
    window = checks.check_int_list("window", window, 3, odd=True)
    stride = checks.check_int_list("stride", stride, 3)
    if math.prod(grid) != n:
        raise ValueError(f"grid={grid} has {math.prod(grid)} positions but x has N={n}")
    if math.prod(window) != w.shape[2]:
        raise ValueError(f"window={window} has {math.prod(window)} offsets but w has M={w.shape[2]} "
                         f"(w: (h, D, M, C) = {tuple(w.shape)})")
    return math.prod(strided_grid(grid, stride))


def _conv_args(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, grid, window, stride, groups: int = 1,
               threads: int | None = None) -> native.ConvArgs:
    """The kernel's arguments: x the grid side (B, h, N, C), y the pattern side
    (B, h, D * N', C), w the weight side (either may be a gradient), with their strides and
    the elements each one's memory holds."""
    b, h, _, c = x.shape
    return native.ConvArgs(B=b, heads=h, C=c, D=w.shape[-3], T=grid[0], H=grid[1], W=grid[2], kt=window[0],
                           kh=window[1], kw=window[2], st=stride[0], sh=stride[1], sw=stride[2], groups=groups,
                           x_sb=x.stride(0), x_sh=x.stride(1), x_sn=x.stride(2), y_sb=y.stride(0), y_sh=y.stride(1),
                           y_sn=y.stride(2), x_len=native.elements(x), w_len=native.elements(w),
                           y_len=native.elements(y), threads=max(1, threads or torch.get_num_threads()))


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
    n_out = _check_geometry(x, w, grid, window, stride)
    x = x if x.stride(-1) == 1 else x.contiguous()
    w = w.contiguous()
    b, h, _, c = x.shape
    y = torch.empty(b, h, w.shape[1] * n_out, c, dtype=x.dtype)
    if y.numel():
        fn = getattr(native.load(), f"structvit_pattern_conv_forward_{_suffix(x)}")
        native.call(fn, _conv_args(x, w, y, grid, window, stride), x, w, y)
    return y


@pattern_conv_forward.register_fake
def _(x, w, grid, window, stride):
    if static_shapes(x, w):  # symbolic sizes (dynamic shapes) are checked by the real kernel
        _check_geometry(x, w, grid, window, stride)
    b, h, _, c = x.shape
    return x.new_empty(b, h, w.shape[1] * math.prod(strided_grid(tuple(grid), tuple(stride))), c)


@torch.library.custom_op("structvit::pattern_conv_backward", mutates_args=(), device_types="cpu")
def pattern_conv_backward(grad_y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, grid: list[int], window: list[int],
                          stride: list[int], need_x: bool, need_w: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`pattern_conv_forward`: (grad x (B, h, N, C) contiguous, grad w
    (h, D, M, C)); one that is not needed comes back as zeros, not computed."""
    n_out = _check_geometry(x, w, grid, window, stride)
    b, h, n, c = x.shape
    checks.check_tensor("grad_y", grad_y, like=x, shape=(b, h, w.shape[1] * n_out, c))
    x = x if x.stride(-1) == 1 else x.contiguous()
    gy = grad_y.contiguous()  # SDPA's backward gives (B, D N', h, C) memory: read in place it measured slower
    w = w.contiguous()
    lib = native.load()
    threads = torch.get_num_threads()
    work = x.numel() and w.numel()  # nothing to sum over: the gradients are zero
    if need_x and work:
        gx = torch.empty(b, h, n, c, dtype=x.dtype)  # the kernel writes every element
        fn = getattr(lib, f"structvit_pattern_conv_grad_input_{_suffix(x)}")
        native.call(fn, _conv_args(gx, w, gy, grid, window, stride, threads=threads), gy, w, gx)
    else:
        gx = torch.zeros(b, h, n, c, dtype=x.dtype)
    if need_w and work:
        groups = weight_groups(b, h, w.shape[1], threads)
        parts = torch.empty(groups, *w.shape, dtype=x.dtype)
        fn = getattr(lib, f"structvit_pattern_conv_grad_weight_{_suffix(x)}")
        native.call(fn, _conv_args(x, parts, gy, grid, window, stride, groups, threads), x, gy, parts)
        gw = parts.sum(0)
    else:
        gw = torch.zeros_like(w)
    return gx, gw


@pattern_conv_backward.register_fake
def _(grad_y, x, w, grid, window, stride, need_x, need_w):
    if static_shapes(x, w):  # symbolic sizes (dynamic shapes) are checked by the real kernel
        _check_geometry(x, w, grid, window, stride)
    return x.new_empty(x.shape), torch.empty_like(w)


register_pattern_conv_autograd(pattern_conv_forward, pattern_conv_backward)


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
    return not torch.onnx.is_in_onnx_export() and native.available_constant()


def pattern_keys_native(x: torch.Tensor, u: torch.Tensor, grid: Grid3, stride: Grid3 = (1, 1, 1)) -> torch.Tensor:
    """:func:`.keyconv.pattern_keys` with the kernel: x (B, h, N, C), u (hu, cu, D, kt, kh, kw)
    -> (B, h, D * N', C)."""
    w = kernel_weight(u.to(x.dtype), x.shape[1], x.shape[3])
    return pattern_conv_forward(x, w, list(grid), list(u.shape[3:]), list(stride))
