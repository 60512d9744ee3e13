"""The correlation backend (forms 2 and 4): the N x N correlation map convolved over the key grid.

Dot-product pattern layouts only (a channel-wise correlation has C maps, not one), at
stride 1 with equal key and value windows. Memory O(B h D N^2); the only backend besides
the naive one that can return the weights of a dot-product layout cheaply.
"""
from __future__ import annotations

import torch

from ..grid import Grid3, depthwise_pattern_weight, grid_conv
from .common import dot_product_patterns, dropout, normalise
from .keyconv import pattern_conv


def correlation(q, k, v, u_k, u_v, grid: Grid3, stride: Grid3, normalize: str, scale: float, dropout_p: float,
                return_weights: bool, memory_limit=None, value_side: str = "auto"):
    """Scores: one grouped convolution whose channels are the (head, query) rows of
    ``q k^T``, D outputs each. Values: either the transposed convolution of the
    D-channel attention back to one N x N map (``value_side="folded"``, form 4,
    cost N^2 M D) or attention over the D pattern-convolved value maps
    (``value_side="shifted"``, form 2, cost D N^2 Cv); "auto" takes the cheaper.
    """
    b, h, n, c = q.shape
    uk5, uv5 = dot_product_patterns(u_k), dot_product_patterns(u_v)  # (hu, D, kt, kh, kw)
    d = uk5.shape[1]
    cv = v.shape[-1]
    corr = torch.matmul(q * scale, k.transpose(-1, -2))  # (B, h, N, N): C_i(j)
    wk = depthwise_pattern_weight(uk5.unsqueeze(1), h, n)  # (h * N * D, 1, k...)
    scores = grid_conv(corr.reshape(b, h * n, n), wk, grid, groups=h * n).reshape(b, h, n, d, n)
    weights = normalise(scores, normalize)
    attn = dropout(weights, dropout_p)
    m = uv5[0, 0].numel()
    if value_side == "auto":
        value_side = "folded" if m * d <= d * cv else "shifted"
    if value_side == "folded":
        wv = depthwise_pattern_weight(uv5.unsqueeze(1), h, n)  # (h * N * D, 1, k...): transposed-conv weight
        folded = grid_conv(attn.reshape(b, h * n * d, n), wv, grid, groups=h * n, transposed=True)  # (B, h*N, N)
        out = torch.matmul(folded.reshape(b, h, n, n), v)
    elif value_side == "shifted":
        v_pat = pattern_conv(v, u_v, grid).reshape(b, h, d * n, cv)  # [V^1 ... V^D]
        out = torch.matmul(attn.reshape(b, h, n, d * n), v_pat)
    else:
        raise ValueError(f"value_side must be 'auto', 'folded' or 'shifted', got {value_side!r}")
    return out, (weights if return_weights else None)
