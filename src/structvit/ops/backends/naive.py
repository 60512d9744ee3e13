"""The naive backend: the equations of StructSA literally, with gathered local contexts."""
from __future__ import annotations

import torch

from ..grid import Grid3, neighbour_index
from .common import dropout, normalise


def _pattern_contexts(x: torch.Tensor, u: torch.Tensor, grid: Grid3, stride: Grid3) -> torch.Tensor:
    """``X^d_{j'c} = sum_o u[h, c, d, o] x_{s j' + o, c}`` (zeros outside the grid).

    x: (B, h, N, C); u: (hu, cu, D, kt, kh, kw) -> (B, h, D, N', C).
    """
    b, h, n, c = x.shape
    index, valid = neighbour_index(grid, tuple(u.shape[3:]), x.device, stride)  # (N', M)
    ctx = x[:, :, index] * valid.to(x.dtype)[..., None]  # (B, h, N', M, C): [x_{s j' + o}]_o
    w = u.flatten(3).expand(h, c, -1, -1)  # (h, C, D, M)
    return torch.einsum("bhjmc,hcdm->bhdjc", ctx, w)


def naive(q, k, v, u_k, u_v, grid: Grid3, stride: Grid3, normalize: str, scale: float, dropout_p: float,
          return_weights: bool, memory_limit=None):
    """Every case (both pattern variants, any stride, separate key and value windows).

    ``s[i, j', d] = scale * sum_c q_ic sum_o u_k[h, c, d, o] k_{s j' + o, c}``, softmax,
    ``y_ic = sum_{j', d} A[i, j', d] sum_o u_v[h, c, d, o] v_{s j' + o, c}``.
    Memory O(B h N' M C) for the contexts and O(B h N D N') for the weights: small inputs
    only; it is the reference the other forms are tested against (together with a
    loop-level implementation in the tests).
    """
    k_pat = _pattern_contexts(k, u_k, grid, stride)  # (B, h, D, N', C)
    v_pat = _pattern_contexts(v, u_v, grid, stride)  # (B, h, D, N', Cv)
    scores = torch.einsum("bhic,bhdjc->bhidj", q, k_pat) * scale
    weights = normalise(scores, normalize)
    out = torch.einsum("bhidj,bhdjc->bhic", dropout(weights, dropout_p), v_pat)
    return out, (weights if return_weights else None)
