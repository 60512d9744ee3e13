"""Pieces shared by the backends: the two softmaxes and attention dropout."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def normalise(scores: torch.Tensor, normalize: str) -> torch.Tensor:
    """Softmax of scores (B, h, N, D, N'): jointly over (d, j'), or over j' for each d."""
    if normalize == "joint":
        b, h, n, d, m = scores.shape
        return torch.softmax(scores.reshape(b, h, n, d * m), dim=-1).reshape(b, h, n, d, m)
    return torch.softmax(scores, dim=-1)


def dropout(a: torch.Tensor, p: float) -> torch.Tensor:
    return F.dropout(a, p=p, training=True) if p > 0 else a


def dot_product_patterns(u: torch.Tensor) -> torch.Tensor:
    """Canonical patterns (hu, 1, D, kt, kh, kw) of the dot-product layouts -> (hu, D, kt, kh, kw)."""
    if u.shape[1] != 1:
        raise ValueError("this backend serves the dot-product pattern layouts only")
    return u[:, 0]
