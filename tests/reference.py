"""Ground truth for the StructSA tests: the equations of docs/design.md written as loops.

Independent of the library's gathers and convolutions: the sums over the key
position j and the window offset o are explicit Python loops (vectorised only over
queries i and patterns d), evaluated in float64.
"""
from __future__ import annotations

import itertools
import math

import torch


def neighbours(grid, window, stride=(1, 1, 1)):
    """For each kept key position j' (the grid positions at multiples of the stride), the
    list of (o, s j' + o) with s j' + o inside the grid."""
    T, H, W = grid
    offsets = list(itertools.product(*[range(-(k // 2), k // 2 + 1) for k in window]))
    table = []
    for t, y, x in itertools.product(range(0, T, stride[0]), range(0, H, stride[1]), range(0, W, stride[2])):
        row = []
        for m, (dt, dy, dx) in enumerate(offsets):
            tt, yy, xx = t + dt, y + dy, x + dx
            if 0 <= tt < T and 0 <= yy < H and 0 <= xx < W:
                row.append((m, (tt * H + yy) * W + xx))
        table.append(row)
    return table


def _per_channel(u, rank, heads, channels):
    """Patterns in any layout -> (heads, channels, D, M) float64."""
    if u.dim() == rank + 1:  # (D, *window): shared by heads and channels
        u = u.expand(heads, channels, *u.shape)
    elif u.dim() == rank + 2:  # (heads, D, *window): shared by a head's channels
        u = u.unsqueeze(1).expand(heads, channels, *u.shape[1:])
    return u.reshape(heads, channels, u.shape[2], -1)


def reference_struct_attention(q, k, v, u_k, u_v, grid, normalize="joint", scale=None, kv_stride=1):
    """Loop form of StructSA in float64, every pattern layout, any stride, separate windows.

    q, k: (B, h, N, C); v: (B, h, N, Cv); u_k, u_v: (h, C, D, *window) channel-wise,
    (h, D, *window) per head or (D, *window) shared (u_v has Cv channels when channel-wise);
    grid (H, W) or (T, H, W). Returns (out (B, h, N, Cv), weights (B, h, N, D, N')).

    s[i, j', d] = scale * sum_c q_ic sum_o u_k[c, d, o] k_{s j' + o, c}; softmax;
    y_ic = sum_{j', d} A[i, j', d] sum_o u_v[c, d, o] v_{s j' + o, c}.
    """
    q, k, v, u_k, u_v = (t.detach().double() for t in (q, k, v, u_k, u_v))
    B, h, N, C = q.shape
    Cv = v.shape[-1]
    rank = len(grid)
    grid3 = (1,) * (3 - rank) + tuple(grid)
    stride = (kv_stride,) * rank if isinstance(kv_stride, int) else tuple(kv_stride)
    stride3 = (1,) * (3 - rank) + stride
    window_k = (1,) * (3 - rank) + tuple(u_k.shape[-rank:])
    window_v = (1,) * (3 - rank) + tuple(u_v.shape[-rank:])
    uk = _per_channel(u_k, rank, h, C)
    uv = _per_channel(u_v, rank, h, Cv)
    D = uk.shape[2]
    scale = C ** -0.5 if scale is None else scale
    table_k = neighbours(grid3, window_k, stride3)
    table_v = neighbours(grid3, window_v, stride3)
    n_kv = len(table_k)
    out = torch.zeros(B, h, N, Cv, dtype=torch.float64)
    weights = torch.zeros(B, h, N, D, n_kv, dtype=torch.float64)
    for b in range(B):
        for hh in range(h):
            s = torch.zeros(N, D, n_kv, dtype=torch.float64)  # s[i, d, j']
            for j in range(n_kv):
                for m, jj in table_k[j]:
                    # sum_c q_ic u_k[c, d, o] k_{jj, c}, for every i and d
                    s[:, :, j] += scale * (q[b, hh] * k[b, hh, jj]) @ uk[hh, :, :, m]
            if normalize == "joint":
                a = torch.softmax(s.reshape(N, D * n_kv), dim=-1).reshape(N, D, n_kv)
            else:
                a = torch.softmax(s, dim=-1)
            y = torch.zeros(N, Cv, dtype=torch.float64)
            for j in range(n_kv):
                for m, jj in table_v[j]:
                    # sum_d A[i, j', d] u_v[c, d, o] v_{jj, c}
                    y += (a[:, :, j] @ uv[hh, :, :, m].T) * v[b, hh, jj][None, :]
            out[b, hh] = y
            weights[b, hh] = a
    return out, weights


def random_inputs(B, heads, grid, C, D, window, shared=False, dtype=torch.float64, cv=None, seed=0, requires_grad=False,
                  layout=None, window_v=None):
    """q, k, v, u_k, u_v drawn from a seeded generator.

    layout: "channel" (heads, C, D, *window), "head" (heads, D, *window) or "shared"
    (D, *window); default "shared" if ``shared`` else "head". window_v: the value window
    (default ``window``).
    """
    gen = torch.Generator().manual_seed(seed)
    N = math.prod(grid)
    cv = C if cv is None else cv
    layout = layout or ("shared" if shared else "head")
    window_v = window if window_v is None else window_v
    q = torch.randn(B, heads, N, C, generator=gen, dtype=torch.float64)
    k = torch.randn(B, heads, N, C, generator=gen, dtype=torch.float64)
    v = torch.randn(B, heads, N, cv, generator=gen, dtype=torch.float64)
    lead = {"channel": lambda c: (heads, c), "head": lambda c: (heads,), "shared": lambda c: ()}[layout]
    u_k = torch.randn(lead(C) + (D,) + tuple(window), generator=gen, dtype=torch.float64) / math.prod(window) ** 0.5
    u_v = torch.randn(lead(cv) + (D,) + tuple(window_v), generator=gen, dtype=torch.float64) / math.prod(window_v) ** 0.5
    return [t.to(dtype).requires_grad_(requires_grad) for t in (q, k, v, u_k, u_v)]
