"""The key-convolution backend (form 3): attention of Q over D * N' convolved keys.

This is how the paper computes StructSA and what its FLOP counts describe: the
patterns are depthwise convolutions of the keys and values (one filter per channel and
pattern for the channel-wise variant, one per head for the dot-product one, evaluated at
every s-th position with a key/value stride s), then ordinary attention over the D * N'
keys [K^1 ... K^D] and values [V^1 ... V^D] (joint softmax), or the sum over d of D
attentions (per-pattern softmax). It serves every case.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..grid import Grid3, depthwise_pattern_weight, grid_conv
from .common import dropout, normalise


def pattern_conv(x: torch.Tensor, u: torch.Tensor, grid: Grid3, stride: Grid3 = (1, 1, 1)) -> torch.Tensor:
    """Convolve a token map with each of the D patterns: ``x^d_{j'c} = sum_o u[h, c, d, o] x_{s j' + o, c}``.

    One grouped convolution over all heads and channels.

    Args:
        x: (B, h, N, C); u: (hu, cu, D, kt, kh, kw) with hu in (1, h), cu in (1, C).

    Returns:
        (B, h, D, N', C).
    """
    b, h, n, c = x.shape
    d = u.shape[2]
    w = depthwise_pattern_weight(u, h, c)  # (h * C * D, 1, k...)
    y = grid_conv(x.transpose(-1, -2).reshape(b, h * c, n), w, grid, groups=h * c, stride=stride)  # (B, h*C*D, N')
    return y.reshape(b, h, c, d, y.shape[-1]).permute(0, 1, 3, 4, 2)


def keyconv(q, k, v, u_k, u_v, grid: Grid3, stride: Grid3, normalize: str, scale: float, dropout_p: float,
            return_weights: bool, memory_limit=None):
    """Runs on ``scaled_dot_product_attention`` (fused, O(N) memory where a fused kernel
    exists). ``return_weights`` computes the weights explicitly instead (O(N D N') memory)."""
    b, h, n, c = q.shape
    d = u_k.shape[2]
    # Contiguous copies: the fused CPU/GPU kernels need unit stride in the channel dim
    # (otherwise SDPA silently falls back to the O(D N^2)-memory math path).
    k_pat = pattern_conv(k, u_k, grid, stride).contiguous()  # (B, h, D, N', C)
    v_pat = pattern_conv(v, u_v, grid, stride).contiguous()  # (B, h, D, N', Cv)
    if return_weights:
        scores = torch.einsum("bhic,bhdjc->bhidj", q * scale, k_pat)
        weights = normalise(scores, normalize)
        out = torch.einsum("bhidj,bhdjc->bhic", dropout(weights, dropout_p), v_pat)
        return out, weights
    if normalize == "joint":
        out = F.scaled_dot_product_attention(q, k_pat.flatten(2, 3), v_pat.flatten(2, 3), dropout_p=dropout_p,
                                             scale=scale)
    else:
        out = F.scaled_dot_product_attention(q.unsqueeze(2).expand(b, h, d, n, c), k_pat, v_pat,
                                             dropout_p=dropout_p, scale=scale).sum(2)
    return out, None
