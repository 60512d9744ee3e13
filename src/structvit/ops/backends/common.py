"""Pieces shared by the backends: the working-memory budget, the two softmaxes and attention dropout."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Attention-sized working memory a call may hold beyond its inputs, outputs and their
# gradients unless ``memory_limit`` says otherwise: a round bound that keeps the video
# models trainable on a 16-24 GiB machine. "auto" picks only backends that fit it; the
# fused kernel plans its chunks and kept maps within it.
DEFAULT_MEMORY_LIMIT = 1 << 30


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


def static_shapes(*tensors: torch.Tensor) -> bool:
    """Whether every size is a plain int, not a symbolic size of a dynamic-shape trace (the
    fake kernels check sizes only then; the real kernels always do)."""
    return all(isinstance(s, int) for t in tensors for s in t.shape)


def register_pattern_conv_autograd(forward, backward) -> None:
    """Autograd of a pattern-convolution custom op pair with the schema
    ``forward(x, w, grid, window, stride) -> y`` and
    ``backward(grad_y, x, w, grid, window, stride, need_x, need_w) -> (grad_x, grad_w)``
    (the CPU kernel's and the Triton kernel's ops share it)."""

    def setup_context(ctx, inputs, output):
        x, w, grid, window, stride = inputs
        ctx.save_for_backward(x, w)
        ctx.geometry = (grid, window, stride)

    def backward_rule(ctx, grad_y):
        x, w = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        gx, gw = backward(grad_y, x, w, *ctx.geometry, need_x, need_w)
        return (gx if need_x else None), (gw if need_w else None), None, None, None

    forward.register_autograd(backward_rule, setup_context=setup_context)
