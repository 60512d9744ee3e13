"""Ground truth for the StructSA tests: DESIGN.md section 1 written as loops.

Independent of the library's gathers and convolutions: the sums over the key
position j and the window offset o are explicit Python loops (vectorised only over
queries i and patterns d), evaluated in float64.
"""
from __future__ import annotations

import itertools
import math

import torch


def neighbours(grid, window):
    """For each key position j, the list of (o, j + o) with j + o inside the grid."""
    T, H, W = grid
    offsets = list(itertools.product(*[range(-(k // 2), k // 2 + 1) for k in window]))
    table = []
    for j in range(T * H * W):
        t, y, x = j // (H * W), (j // W) % H, j % W
        row = []
        for m, (dt, dy, dx) in enumerate(offsets):
            tt, yy, xx = t + dt, y + dy, x + dx
            if 0 <= tt < T and 0 <= yy < H and 0 <= xx < W:
                row.append((m, (tt * H + yy) * W + xx))
        table.append(row)
    return table


def reference_struct_attention(q, k, v, u_k, u_v, grid, normalize="joint", scale=None):
    """Loop form of StructSA in float64.

    q, k: (B, h, N, C); v: (B, h, N, Cv); u_k, u_v: (h, D, *window) or (D, *window);
    grid (H, W) or (T, H, W). Returns (out (B, h, N, Cv), weights (B, h, N, D, N)).
    """
    q, k, v, u_k, u_v = (t.detach().double() for t in (q, k, v, u_k, u_v))
    B, h, N, C = q.shape
    rank = len(grid)
    grid3 = (1,) * (3 - rank) + tuple(grid)
    if u_k.dim() == rank + 1:  # shared by heads
        u_k, u_v = u_k.expand(h, *u_k.shape), u_v.expand(h, *u_v.shape)
    window = (1,) * (3 - rank) + tuple(u_k.shape[2:])
    D = u_k.shape[1]
    uk = u_k.reshape(h, D, -1)
    uv = u_v.reshape(h, D, -1)
    scale = C ** -0.5 if scale is None else scale
    table = neighbours(grid3, window)
    out = torch.zeros(B, h, N, v.shape[-1], dtype=torch.float64)
    weights = torch.zeros(B, h, N, D, N, dtype=torch.float64)
    for b in range(B):
        for hh in range(h):
            corr = q[b, hh] @ k[b, hh].T  # corr[i, j] = <q_i, k_j>
            s = torch.zeros(N, D, N, dtype=torch.float64)  # s[i, d, j]
            for j in range(N):
                for m, jj in table[j]:
                    s[:, :, j] += scale * uk[hh, :, m][None, :] * corr[:, jj][:, None]
            if normalize == "joint":
                a = torch.softmax(s.reshape(N, D * N), dim=-1).reshape(N, D, N)
            else:
                a = torch.softmax(s, dim=-1)
            y = torch.zeros(N, v.shape[-1], dtype=torch.float64)
            for j in range(N):
                for m, jj in table[j]:
                    kappa = a[:, :, j] @ uv[hh, :, m]  # kappa[i, j, o] = sum_d A[i, j, d] U^V[d, o]
                    y += kappa[:, None] * v[b, hh, jj][None, :]
            out[b, hh] = y
            weights[b, hh] = a
    return out, weights


def random_inputs(B, heads, grid, C, D, window, shared=False, dtype=torch.float64, cv=None, seed=0, requires_grad=False):
    """q, k, v, u_k, u_v drawn from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    N = math.prod(grid)
    cv = C if cv is None else cv
    q = torch.randn(B, heads, N, C, generator=gen, dtype=torch.float64)
    k = torch.randn(B, heads, N, C, generator=gen, dtype=torch.float64)
    v = torch.randn(B, heads, N, cv, generator=gen, dtype=torch.float64)
    pshape = ((D,) if shared else (heads, D)) + tuple(window)
    u_k = torch.randn(pshape, generator=gen, dtype=torch.float64) / math.prod(window) ** 0.5
    u_v = torch.randn(pshape, generator=gen, dtype=torch.float64) / math.prod(window) ** 0.5
    return [t.to(dtype).requires_grad_(requires_grad) for t in (q, k, v, u_k, u_v)]
