"""The key-convolution backend (form 3): attention of Q over D * N' convolved keys.

This is how the paper computes StructSA and what its FLOP counts describe: the
patterns are depthwise convolutions of the keys and values (one filter per channel and
pattern for the channel-wise variant, one per head for the dot-product one, evaluated at
every s-th position with a key/value stride s), then ordinary attention over the D * N'
keys [K^1 ... K^D] and values [V^1 ... V^D] (joint softmax), or the sum over d of D
attentions (per-pattern softmax). It serves every case.

The convolved keys go to ``scaled_dot_product_attention`` as (B, h, D * N', C) with unit
stride in C (its fused kernels need that). How the convolution is laid out to get there
with as few copies as possible (:func:`pattern_layout`):

- ``"spatial_c"`` (dot-product patterns on an image grid, CPU): the filters do not depend
  on the channel, so C is one more spatial axis, with a window of size 1 along it: a
  conv3d over (H, W, C) whose output (B, h * D, H', W', C) *is* (B, h, D * N', C), with no
  layout copy. (For a video this needs a fourth spatial axis; folding C into W with
  dilated taps measured slower than the default layout there, on 2 threads far slower.)
- ``"channels_last"`` (channel-wise patterns, CPU): one depthwise convolution with D
  outputs per channel, input and output in channels-last memory format (the CPU kernels
  are faster there), then one copy from (B, N', h, C, D) to (B, h, D, N', C).
- ``"channels_first"`` (dot-product patterns on a video grid, and other devices, where the
  two above were not measured; bfloat16 video grids of 1 x 1 frames): the same convolution
  in the default layout, then one copy from (B, h, C, D, N') to (B, h, D, N', C).
- ``"native"`` (CPU, float32 / float64, where the native library builds): one kernel
  (:mod:`.native_conv`) that reads x in place and writes (B, h, D * N', C) directly, with
  its own backward; it replaces the layouts above where it is faster (:func:`pattern_layout`).
- ``"triton"`` (CUDA, where Triton is installed): the same contract as ``"native"`` as Triton
  kernels (:mod:`..triton.pattern_conv`), any dtype; ``STRUCTVIT_TRITON=0``
  (``config.set_triton(False)``) goes back to PyTorch's convolutions (``"channels_first"``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ... import config
from ..grid import Grid3, depthwise_pattern_weight, grid_conv, strided_grid
from ..triton import available as triton_available
from . import native_conv
from .common import dropout, normalise

LAYOUTS = ("spatial_c", "channels_last", "channels_first", "native", "triton")


def triton_serves(x: torch.Tensor) -> bool:
    """Whether the Triton kernels compute ``x``'s pattern convolution: a CUDA tensor, Triton
    installed, not switched off (``config.set_triton``, ``STRUCTVIT_TRITON``), and not an ONNX
    export (ONNX has no such operator; the PyTorch layouts export)."""
    return (x.device.type == "cuda" and config.settings().triton and triton_available()
            and not torch.onnx.is_in_onnx_export())


def pattern_layout(x: torch.Tensor, u: torch.Tensor, grid: Grid3, stride: Grid3) -> str:
    """The convolution layout :func:`pattern_keys` uses for ``x`` (B, h, N, C) and patterns
    ``u`` (hu, cu, D, kt, kh, kw) (the choices were measured with ``bench op`` A/B)."""
    if x.device.type != "cpu":
        return "triton" if triton_serves(x) else "channels_first"
    if native_conv.serves(x):
        return "native"
    if u.shape[1] == 1 and grid[0] == 1:
        return "spatial_c"
    # bfloat16 (and half) conv3d on the CPU computes wrong weight gradients for channels-last
    # (non-contiguous) inputs (tests/engine/test_engine.py's video autocast test, test_ops.py's
    # layout test); reduced-precision video keeps the default layout, whose input is contiguous
    if u.shape[1] > 1 and (x.dtype in (torch.float32, torch.float64) or grid[0] == 1):
        return "channels_last"
    return "channels_first"


def pattern_keys(x: torch.Tensor, u: torch.Tensor, grid: Grid3, stride: Grid3 = (1, 1, 1),
                 layout: str | None = None) -> torch.Tensor:
    """Convolve a token map with each of the D patterns: ``x^d_{j'c} = sum_o u[h, c, d, o] x_{s j' + o, c}``.

    One grouped convolution over all heads and channels.

    Args:
        x: (B, h, N, C); u: (hu, cu, D, kt, kh, kw) with hu in (1, h), cu in (1, C).
        layout: one of ``LAYOUTS`` (default: :func:`pattern_layout`'s choice); all give the
            same values.

    Returns:
        (B, h, D * N', C), pattern-major (d * N' + j'), unit stride in C.
    """
    layout = pattern_layout(x, u, grid, stride) if layout is None else layout
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "native":
        return native_conv.pattern_keys_native(x, u, grid, stride)
    if layout == "triton":
        from ..triton.pattern_conv import pattern_keys_triton  # imports Triton: only when used

        return pattern_keys_triton(x, u, grid, stride)
    b, h, n, c = x.shape
    d = u.shape[2]
    n_out = math.prod(strided_grid(grid, stride))
    T, H, W = grid
    kt, kh, kw = u.shape[3:]
    if layout == "spatial_c":
        if u.shape[1] != 1 or T != 1:
            raise ValueError("pattern_keys: layout 'spatial_c' needs dot-product patterns (cu == 1) on an image "
                             f"grid (T == 1), got cu={u.shape[1]}, T={T}")
        w = u.expand(h, 1, *u.shape[2:]).reshape(h * d, 1, kt, kh, kw)[:, :, kt // 2, :, :, None]  # (h*D, 1, kh, kw, 1)
        # taps (kh, kw, 1) over (H, W, C); a kt > 1 window only sees padding when T == 1. reshape
        # copies a non-contiguous x (e.g. sliced from a qkv projection): CPU bf16 convolutions
        # compute wrong weight gradients for non-contiguous inputs
        y = F.conv3d(x.reshape(b, h, H, W, c), w, padding=(kh // 2, kw // 2, 0), stride=(stride[1], stride[2], 1),
                     groups=h)
        return y.reshape(b, h, d * n_out, c)
    weight = depthwise_pattern_weight(u, h, c)  # (h * C * D, 1, k...); channel (head, c, d)
    if layout == "channels_first":
        y = grid_conv(x.transpose(-1, -2).reshape(b, h * c, n), weight, grid, groups=h * c, stride=stride)
        return y.reshape(b, h, c, d, n_out).permute(0, 1, 3, 4, 2).contiguous().view(b, h, d * n_out, c)
    xl = x.transpose(1, 2).contiguous()  # (B, N, h, C): channels-last of (B, h * C, *grid)
    if T == 1:
        xi = xl.reshape(b, H, W, h * c).permute(0, 3, 1, 2)
        y = F.conv2d(xi, weight[:, :, kt // 2], padding=(kh // 2, kw // 2), stride=stride[1:], groups=h * c)
    else:
        xi = xl.reshape(b, T, H, W, h * c).permute(0, 4, 1, 2, 3)
        y = F.conv3d(xi, weight, padding=(kt // 2, kh // 2, kw // 2), stride=stride, groups=h * c)
    y = y.movedim(1, -1).reshape(b, n_out, h, c, d)  # a view when the output is channels-last
    return y.permute(0, 2, 4, 1, 3).contiguous().view(b, h, d * n_out, c)


def pattern_conv(x: torch.Tensor, u: torch.Tensor, grid: Grid3, stride: Grid3 = (1, 1, 1)) -> torch.Tensor:
    """:func:`pattern_keys` as (B, h, D, N', C)."""
    y = pattern_keys(x, u, grid, stride)
    return y.unflatten(2, (u.shape[2], math.prod(strided_grid(grid, stride))))


def keyconv(q, k, v, u_k, u_v, grid: Grid3, stride: Grid3, normalize: str, scale: float, dropout_p: float,
            return_weights: bool, memory_limit=None):
    """Runs on ``scaled_dot_product_attention`` (fused, O(N) memory where a fused kernel
    exists). ``return_weights`` computes the weights explicitly instead (O(N D N') memory)."""
    b, h, n, c = q.shape
    d = u_k.shape[2]
    n_kv = math.prod(strided_grid(grid, stride))  # explicit sizes: B = 0 is allowed
    k_pat = pattern_keys(k, u_k, grid, stride)  # (B, h, D * N', C)
    v_pat = pattern_keys(v, u_v, grid, stride)  # (B, h, D * N', Cv)
    if return_weights:
        k5, v5 = k_pat.unflatten(2, (d, n_kv)), v_pat.unflatten(2, (d, n_kv))
        scores = torch.einsum("bhic,bhdjc->bhidj", q * scale, k5)
        weights = normalise(scores, normalize)
        out = torch.einsum("bhidj,bhdjc->bhic", dropout(weights, dropout_p), v5)
        return out, weights
    if normalize == "joint":
        out = F.scaled_dot_product_attention(q, k_pat, v_pat, dropout_p=dropout_p, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q.unsqueeze(2).expand(b, h, d, n, c), k_pat.unflatten(2, (d, n_kv)),
                                             v_pat.unflatten(2, (d, n_kv)), dropout_p=dropout_p, scale=scale).sum(2)
    return out, None
