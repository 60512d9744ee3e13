"""FLOP formulas for PyTorch's FLOP counter (``torch.utils.flop_counter.FlopCounterMode``).

Registered on import of :mod:`structvit.ops`, so every FLOP count in the project (``structvit
models``, ``structvit report``, the study) counts what eager mode runs:

- ``structvit::fused_forward`` / ``structvit::fused_backward``, the fused CPU kernel: the
  folded form's work (see :func:`fused_forward_flops`);
- ``structvit::pattern_conv_forward`` / ``structvit::pattern_conv_backward``, keyconv's
  pattern convolutions on the CPU: counted as the depthwise convolutions they replace
  (every window offset of every output, as PyTorch counts a convolution);
- ``structvit::triton_pattern_conv_forward`` / ``_backward``, the same on CUDA (Triton), with
  the same formulas; registered by :func:`register_pattern_conv_formulas` when
  :mod:`.triton.pattern_conv` is imported (only where keyconv uses it: importing Triton
  costs time);
- ``structvit::triton_depthwise_conv_forward`` / ``_backward``, the backbone's depthwise
  convolutions on CUDA (Triton): counted as PyTorch counts the convolution they replace;
  registered by :func:`register_depthwise_formulas` when :mod:`.triton.depthwise` is imported;
- ``aten::_scaled_dot_product_flash_attention_for_cpu`` (and its backward), PyTorch's CPU
  attention kernel, which ``FlopCounterMode`` does not count by itself (its CUDA
  counterparts are counted with the same formula).

Counts are FLOPs (2 per multiply-add), the counter's convention.
"""
from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

from .backends import fused, native_conv  # noqa: F401  (registers the structvit:: custom ops)


def fused_forward_flops(q_shape, v_shape, uk_shape) -> int:
    """FLOPs of the fused forward: per (batch, head), ``q K^T`` (N^2 C), the D-output
    key-grid convolution and the transposed convolution back (N^2 M D each) and ``At V``
    (N^2 Cv)."""
    b, h, n, c = q_shape
    cv = v_shape[-1]
    d, m = uk_shape[1], math.prod(uk_shape[2:])
    return 2 * b * h * n * n * (c + cv + 2 * m * d)


def fused_backward_flops(q_shape, v_shape, uk_shape, at_kept: bool, s0_kept: bool) -> int:
    """FLOPs of the fused backward: ``dY V^T`` and ``At^T dY`` (N^2 Cv each), the kernel's
    convolution passes (recomputed scores, gradient through the transposed convolution and
    through the convolution, both pattern gradients: 5 N^2 M D, one more when At is
    recomputed), ``dS0 K`` and ``Q^T dS0`` (N^2 C each) and ``q K^T`` when S0 was not kept."""
    b, h, n, c = q_shape
    cv = v_shape[-1]
    d, m = uk_shape[1], math.prod(uk_shape[2:])
    macs = n * n * (2 * cv + (5 + (not at_kept)) * m * d + (2 + (not s0_kept)) * c)
    return 2 * b * h * macs


@register_flop_formula(torch.ops.structvit.fused_forward)
def _fused_forward_formula(q_shape, k_shape, v_shape, uk_shape, uv_shape, *args, out_shape=None, **kwargs) -> int:
    return fused_forward_flops(q_shape, v_shape, uk_shape)


@register_flop_formula(torch.ops.structvit.fused_backward)
def _fused_backward_formula(grad_shape, q_shape, k_shape, v_shape, uk_shape, uv_shape, out_shape_, lse_shape, at_shape,
                            s0_shape, *args, out_shape=None, **kwargs) -> int:
    return fused_backward_flops(q_shape, v_shape, uk_shape, math.prod(at_shape) > 0, math.prod(s0_shape) > 0)


def pattern_conv_flops(y_shape, w_shape) -> int:
    """FLOPs of one pass of a pattern convolution with output (B, h, D * N', C) and kernel
    weights (h, D, M, C): M multiply-adds per output element."""
    return 2 * math.prod(y_shape) * w_shape[2]


def _pattern_conv_forward_formula(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return pattern_conv_flops(out_shape, w_shape)


def _pattern_conv_backward_formula(grad_shape, x_shape, w_shape, grid, window, stride, need_x, need_w, *args,
                                   out_shape=None, **kwargs) -> int:
    return pattern_conv_flops(grad_shape, w_shape) * (int(need_x) + int(need_w))


def register_pattern_conv_formulas(forward_op, backward_op) -> None:
    """Count a pattern-convolution op pair (the signatures of ``structvit::pattern_conv_forward``
    and ``_backward``) with :func:`pattern_conv_flops`."""
    register_flop_formula(forward_op)(_pattern_conv_forward_formula)
    register_flop_formula(backward_op)(_pattern_conv_backward_formula)


register_pattern_conv_formulas(torch.ops.structvit.pattern_conv_forward, torch.ops.structvit.pattern_conv_backward)


def depthwise_flops(y_shape, w_shape) -> int:
    """FLOPs of one pass of a depthwise convolution with output (B, C, [T,] H, W) and weight
    (C, 1, [kt,] kh, kw): one multiply-add per window offset per output element."""
    return 2 * math.prod(y_shape) * math.prod(w_shape[2:])


def register_depthwise_formulas(forward_op, backward_op) -> None:
    """Count a depthwise-convolution op pair (``forward(x, weight, bias)``,
    ``backward(grad_y, x, weight, need_x, need_w)``) with :func:`depthwise_flops`."""

    def forward_formula(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return depthwise_flops(x_shape, w_shape)

    def backward_formula(grad_shape, x_shape, w_shape, need_x, need_w, *args, out_shape=None, **kwargs) -> int:
        return depthwise_flops(grad_shape, w_shape) * (int(need_x) + int(need_w))

    register_flop_formula(forward_op)(forward_formula)
    register_flop_formula(backward_op)(backward_formula)


_cpu_sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_cpu_sdpa_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


@register_flop_formula(_cpu_sdpa)
def _cpu_sdpa_formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@register_flop_formula(_cpu_sdpa_backward)
def _cpu_sdpa_backward_formula(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                               **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)
