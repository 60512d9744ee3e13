"""Convolutions over a token grid, shared by the StructSA backends.

Tokens are stored flat, ``N = T * H * W`` in row-major (t, h, w) order. Every
shifted-window sum of the op (over the key grid) is written as one grouped
convolution whose channels are independent rows (query rows, or head channels),
so that a single ``conv2d``/``conv3d`` call does all of them.

All helpers take the canonical 3-D forms: ``grid = (T, H, W)`` and windows of
shape ``(kt, kh, kw)`` (an image is ``T = 1`` with ``kt = 1``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Grid3 = tuple[int, int, int]


def grid_conv(x: torch.Tensor, weight: torch.Tensor, grid: Grid3, groups: int, transposed: bool = False) -> torch.Tensor:
    """Zero-padded, size-preserving grouped (transposed) cross-correlation over the grid.

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

    Returns:
        (B', C_out, N).
    """
    T, H, W = grid
    kt, kh, kw = weight.shape[-3:]
    b = x.shape[0]
    if T == 1:
        # The temporal taps of a kt > 1 window only ever see zero padding when
        # T == 1, so only the centre slice contributes: a 2-D conv is exact.
        conv = F.conv_transpose2d if transposed else F.conv2d
        y = conv(x.reshape(b, -1, H, W), weight[:, :, kt // 2], padding=(kh // 2, kw // 2), groups=groups)
    else:
        conv = F.conv_transpose3d if transposed else F.conv3d
        y = conv(x.reshape(b, -1, T, H, W), weight, padding=(kt // 2, kh // 2, kw // 2), groups=groups)
    return y.reshape(b, y.shape[1], T * H * W)


def depthwise_pattern_weight(u: torch.Tensor, heads: int, rows: int) -> torch.Tensor:
    """Grouped-conv weight that applies the D patterns of each head to ``rows`` channels.

    Args:
        u: (heads or 1, D, kt, kh, kw) patterns (per head, or shared by all heads).
        heads: number of heads.
        rows: independent channels per head (query rows, or head channels).

    Returns:
        (heads * rows * D, 1, kt, kh, kw); channel ``(head * rows + r) * D + d`` holds
        ``u[head, d]``, i.e. groups ``heads * rows`` with D outputs each.
    """
    d = u.shape[1]
    window = u.shape[2:]
    return u.expand(heads, d, *window).unsqueeze(1).expand(heads, rows, d, *window).reshape(heads * rows * d, 1, *window)


def neighbour_index(grid: Grid3, window: Grid3, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of ``j + o`` for every grid position j and window offset o.

    Offsets are enumerated in row-major (ot, oh, ow) order, the order of a flattened
    ``(kt, kh, kw)`` kernel, so ``index[:, m]`` pairs with ``u.flatten(-3)[..., m]``.

    Returns:
        index: (N, M) long, 0 where the neighbour falls outside the grid.
        valid: (N, M) bool, False where the neighbour falls outside the grid.
    """
    pos = torch.stack(torch.meshgrid(*[torch.arange(s, device=device) for s in grid], indexing="ij"), -1).reshape(-1, 3)
    off = torch.stack(torch.meshgrid(*[torch.arange(k, device=device) - k // 2 for k in window], indexing="ij"), -1).reshape(-1, 3)
    nb = pos[:, None, :] + off[None, :, :]  # (N, M, 3)
    size = torch.tensor(grid, device=device)
    valid = ((nb >= 0) & (nb < size)).all(-1)
    index = (nb[..., 0] * grid[1] + nb[..., 1]) * grid[2] + nb[..., 2]
    return torch.where(valid, index, torch.zeros_like(index)), valid
