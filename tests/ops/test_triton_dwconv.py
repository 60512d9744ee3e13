"""The backbone's depthwise convolutions: the Triton kernel (structvit.ops.triton.depthwise) and
the modules that use it on CUDA (structvit.nn.dwconv).

The ``interp`` tests run in test_triton_conv.py's interpreted subprocess (see there); the
``cuda`` ones where a GPU is present.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from structvit.nn.dwconv import DepthwiseConv2d, DepthwiseConv3d, depthwise_conv

HAVE_TRITON = importlib.util.find_spec("triton") is not None
interp = pytest.mark.skipif(not (HAVE_TRITON and os.environ.get("TRITON_INTERPRET") == "1"),
                            reason="runs in test_triton_conv.py's interpreted subprocess (TRITON_INTERPRET=1)")
cuda = pytest.mark.skipif(not (HAVE_TRITON and torch.cuda.is_available()), reason="needs CUDA and Triton")

# (input shape, window, channels-last memory): 2-D 3x3 and 5x5, 3-D 3x3x3, odd sizes
CASES = [
    ((2, 5, 6, 7), 3, False),
    ((2, 6, 7, 5), 5, True),
    ((2, 3, 3, 5, 4), 3, False),
    ((1, 5, 4, 3, 5), 3, True),
]


def _reference(x, weight, bias):
    conv = F.conv2d if x.dim() == 4 else F.conv3d
    return conv(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])


def _inputs(shape, k, channels_last, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    weight = torch.randn(shape[1], 1, *(k,) * (len(shape) - 2), generator=gen, dtype=torch.float64) / k
    bias = torch.randn(shape[1], generator=gen, dtype=torch.float64)
    x, weight, bias = (t.to(device=device, dtype=dtype) for t in (x, weight, bias))
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x, weight, bias


def _values_and_grads(fn, x, weight, bias, grad):
    x, weight, bias = (t.detach().requires_grad_() for t in (x, weight, bias))
    y = fn(x, weight, bias)
    return (y, *torch.autograd.grad((y * grad.to(y.dtype)).sum(), (x, weight, bias)))


@interp
@pytest.mark.parametrize("shape, k, channels_last", CASES)
def test_triton_interp_depthwise_matches_pytorch_conv(shape, k, channels_last):
    """Values and the gradients of x, weight and bias equal F.conv2d / F.conv3d in float64;
    the output keeps the input's memory format."""
    from structvit.ops.triton.depthwise import depthwise_conv_forward

    x, weight, bias = _inputs(shape, k, channels_last, torch.float64)
    grad = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = _values_and_grads(depthwise_conv_forward, x, weight, bias, grad)
    want = _values_and_grads(_reference, x, weight, bias, grad)
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    assert got[0].is_contiguous(memory_format=fmt if channels_last else torch.contiguous_format)
    for name, g, w in zip(("y", "grad x", "grad weight", "grad bias"), got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12, msg=name)


@interp
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_triton_interp_depthwise_low_precision(dtype, tol):
    """float32 / bfloat16 (fp32 accumulation) against float64 PyTorch convolutions of the same values."""
    from structvit.ops.triton.depthwise import depthwise_conv_forward

    x, weight, bias = _inputs((2, 6, 5, 6), 5, True, dtype)
    grad = torch.ones(1)
    got = _values_and_grads(depthwise_conv_forward, x, weight, bias, grad)
    want = _values_and_grads(_reference, x.double(), weight.double(), bias.double(), grad)
    for name, g, w in zip(("y", "grad x", "grad weight", "grad bias"), got, want):
        assert g.dtype == dtype
        rel = ((g.double() - w).abs().max() / w.abs().max()).item()
        assert rel < tol, f"{name}: relative error {rel:.2e} in {dtype}"


@interp
def test_triton_interp_depthwise_gradcheck_and_flops():
    """gradcheck in float64 through the custom op; FlopCounterMode counts its forward as PyTorch
    counts the convolution it replaces, and each gradient as one such pass."""
    from torch.utils.flop_counter import FlopCounterMode

    from structvit.ops.triton.depthwise import depthwise_conv_forward

    x, weight, bias = (t.requires_grad_() for t in _inputs((1, 2, 2, 3, 3), 3, False, torch.float64))
    assert torch.autograd.gradcheck(depthwise_conv_forward, (x, weight, bias), fast_mode=True)
    counter = FlopCounterMode(display=False)
    with counter:
        depthwise_conv_forward(x, weight, bias).sum().backward()
    counts = counter.get_flop_counts()["Global"]
    reference = FlopCounterMode(display=False)
    with reference:
        _reference(x, weight, bias)
    one_pass = reference.get_total_flops()
    assert one_pass == 2 * x.numel() * 27
    assert counts[torch.ops.structvit.triton_depthwise_conv_forward] == one_pass
    # the input and weight gradients are one pass each (PyTorch's counter counts a grouped
    # convolution's weight gradient as if it were not grouped)
    assert counts[torch.ops.structvit.triton_depthwise_conv_backward] == 2 * one_pass


@pytest.mark.parametrize("video", [False, True])
def test_triton_depthwise_module_is_a_torch_conv(video):
    """Same parameters and state-dict keys as the nn.Conv module it replaces (checkpoints load
    both ways), PyTorch's convolution on the CPU."""
    module = depthwise_conv(6, 3, video)
    plain = (nn.Conv3d if video else nn.Conv2d)(6, 6, 3, padding=1, groups=6)
    assert isinstance(module, nn.Conv3d if video else nn.Conv2d)
    assert {k: v.shape for k, v in module.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    plain.load_state_dict(module.state_dict())
    x = torch.randn(2, 6, *((3,) if video else ()), 5, 4)
    torch.testing.assert_close(module(x), plain(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="kernel_size must be an odd"):
        DepthwiseConv2d(6, 4)


@cuda
@pytest.mark.parametrize("shape, k, channels_last", CASES + [((4, 64, 8, 14, 14), 5, True), ((8, 128, 28, 28), 3, False)])
def test_triton_cuda_depthwise_matches_pytorch(shape, k, channels_last):
    """On the GPU: the module with the Triton kernel against PyTorch's convolution (float32
    values and gradients, bf16 autocast loosely)."""
    from structvit import config

    x, weight, bias = _inputs(shape, k, channels_last, torch.float32, device="cuda")
    module = (DepthwiseConv3d if x.dim() == 5 else DepthwiseConv2d)(shape[1], k).cuda()
    with torch.no_grad():
        module.weight.copy_(weight)
        module.bias.copy_(bias)
    grad = torch.randn(shape, device="cuda")
    results = []
    for use_triton in (True, False):
        config.set_triton(use_triton)
        try:
            xi = x.detach().requires_grad_()
            y = module(xi)
            module.zero_grad()
            (y * grad).sum().backward()
            results.append((y, xi.grad, module.weight.grad.clone(), module.bias.grad.clone()))
            with torch.autocast("cuda", dtype=torch.bfloat16):
                yb = module(x)
            assert yb.dtype == torch.bfloat16
            results[-1] += (yb,)
        finally:
            config.set_triton(True)
    for name, g, w in zip(("y", "grad x", "grad weight", "grad bias"), results[0][:4], results[1][:4]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=name)
    rel = ((results[0][4].float() - results[1][0]).abs().max() / results[1][0].abs().max()).item()
    assert rel < 2e-2
