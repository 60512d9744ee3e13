"""Convolutions over a token grid, shared by the StructSA backends.

Tokens are stored flat, ``N = T * H * W`` in row-major (t, h, w) order. Every
shifted-window sum of the op (over the key grid) is written as one grouped
convolution whose channels are independent rows (query rows, or head channels),
so that a single ``conv2d``/``conv3d`` call does all of them.

All helpers take the canonical 3-D forms: ``grid = (T, H, W)``, strides ``(st, sh, sw)``
and windows of shape ``(kt, kh, kw)`` (an image is ``T = 1``).

A key/value stride s keeps the positions 0, s, 2s, ... of each axis, with windows centred
there: the positions a convolution with padding ``k // 2`` and stride s visits, so an axis
of n positions keeps ceil(n / s).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Grid3 = tuple[int, int, int]


def strided_grid(grid: Grid3, stride: Grid3) -> Grid3:
    """The grid of key/value positions kept with ``stride``: ceil(n / s) per axis."""
    return tuple(-(-n // s) for n, s in zip(grid, stride))


def grid_conv(x: torch.Tensor, weight: torch.Tensor, grid: Grid3, groups: int, transposed: bool = False,
              stride: Grid3 = (1, 1, 1)) -> torch.Tensor:
    """Zero-padded grouped (transposed) cross-correlation over the grid.

    ``transposed=False``: ``out[b, c_out, j] = sum_o weight[c_out, c_in, o] * x[b, c_in, j + o]``;
    ``transposed=True``: ``out[b, c_out, j] = sum_o weight[c_in, c_out, o] * x[b, c_in, j - o]``,
    the adjoint, used to fold the value side of StructSA. Zero outside the grid; the
    offset ``o`` runs over the centred window.

    Args:
        x: (B', C_in, N) with N = T * H * W.
        weight: (C_out, C_in // groups, kt, kh, kw), or (C_in, C_out // groups, kt, kh, kw)
            when transposed; odd window sizes.
        grid: (T, H, W).
        groups: number of groups, as in ``torch.nn.functional.conv3d``.
        stride: evaluate at every s-th position of each axis (not with ``transposed``).

    Returns:
        (B', C_out, N') with N' = the number of positions of ``strided_grid(grid, stride)``.
    """
    T, H, W = grid
    kt, kh, kw = weight.shape[-3:]
    b = x.shape[0]
    # CPU bf16 conv3d computes wrong weight gradients for a non-contiguous input (e.g. keys
    # sliced from the qkv projection); a contiguous copy is exact
    x = x.contiguous()
    if transposed and stride != (1, 1, 1):
        raise ValueError("grid_conv: a transposed convolution is only used at stride 1")
    if T == 1:
        # The temporal taps of a kt > 1 window only ever see zero padding when
        # T == 1, so only the centre slice contributes: a 2-D conv is exact.
        conv = F.conv_transpose2d if transposed else F.conv2d
        extra = {} if transposed else {"stride": stride[1:]}
        y = conv(x.reshape(b, x.shape[1], H, W), weight[:, :, kt // 2], padding=(kh // 2, kw // 2), groups=groups, **extra)
    else:
        conv = F.conv_transpose3d if transposed else F.conv3d
        extra = {} if transposed else {"stride": stride}
        y = conv(x.reshape(b, x.shape[1], T, H, W), weight, padding=(kt // 2, kh // 2, kw // 2), groups=groups, **extra)
    return y.reshape(b, y.shape[1], math.prod(y.shape[2:]))  # explicit sizes: B = 0 is allowed


def depthwise_pattern_weight(u: torch.Tensor, heads: int, rows: int) -> torch.Tensor:
    """Grouped-conv weight that applies D patterns to each of ``rows`` channels of each head.

    Args:
        u: (heads or 1, rows or 1, D, kt, kh, kw) patterns: per head or shared by all heads,
            per channel (channel-wise) or shared by the channels of a head (dot-product).
        heads: number of heads.
        rows: independent channels per head (head channels, or query rows).

    Returns:
        (heads * rows * D, 1, kt, kh, kw); channel ``(head * rows + r) * D + d`` holds
        ``u[head, r, d]`` (broadcast where u has size 1), i.e. groups ``heads * rows`` with
        D outputs each.
    """
    d = u.shape[2]
    window = u.shape[3:]
    return u.expand(heads, rows, d, *window).reshape(heads * rows * d, 1, *window)


def neighbour_index(grid: Grid3, window: Grid3, device: torch.device,
                    stride: Grid3 = (1, 1, 1)) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of ``s * j' + o`` for every kept position j' (all of them at stride 1) and window offset o.

    Offsets are enumerated in row-major (ot, oh, ow) order, the order of a flattened
    ``(kt, kh, kw)`` kernel, so ``index[:, m]`` pairs with ``u.flatten(-3)[..., m]``.

    Returns:
        index: (N', M) long, 0 where the neighbour falls outside the grid.
        valid: (N', M) bool, False where the neighbour falls outside the grid.
    """
    axes = [torch.arange(0, n, s, device=device) for n, s in zip(grid, stride)]
    pos = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    off = torch.stack(torch.meshgrid(*[torch.arange(k, device=device) - k // 2 for k in window], indexing="ij"), -1).reshape(-1, 3)
    nb = pos[:, None, :] + off[None, :, :]  # (N, M, 3)
    size = torch.tensor(grid, device=device)
    valid = ((nb >= 0) & (nb < size)).all(-1)
    index = (nb[..., 0] * grid[1] + nb[..., 1]) * grid[2] + nb[..., 2]
    return torch.where(valid, index, torch.zeros_like(index)), valid
