"""keyconv's pattern-convolution kernel (backends/native_conv.py, csrc/pattern_conv_cpu.cpp):
exact against PyTorch's convolutions, gradcheck, strided inputs, a real custom op that
compile, export and the FLOP counter see, and the fallbacks where it cannot run."""
import math

import pytest
import torch
from reference import random_inputs

from structvit.ops import native, struct_attention
from structvit.ops.backends.keyconv import pattern_keys, pattern_layout
from structvit.ops.backends import native_conv

pytestmark = pytest.mark.skipif(not native.available(), reason="the native library does not build here")

CASES = [  # grid, window, stride, cu (1: a dot-product layout expanded over channels)
    ((1, 14, 14), (1, 3, 3), (1, 1, 1), 8),
    ((1, 14, 14), (1, 3, 3), (1, 2, 2), 8),
    ((1, 7, 7), (1, 3, 3), (1, 2, 2), 8),  # odd grid at stride 2: the last window is clipped
    ((4, 6, 6), (3, 3, 3), (1, 2, 2), 8),
    ((3, 5, 7), (3, 1, 5), (2, 1, 3), 1),
    ((2, 5, 6), (1, 5, 5), (1, 1, 1), 1),
    ((2, 1, 1), (3, 1, 1), (1, 1, 1), 8),
]


def _qkv_view(b, h, n, c, dtype=torch.float64, seed=0):
    """k as a strided view of one (B, N, 3, h, C) projection, as the models pass it."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, n, 3, h, c, generator=gen, dtype=dtype).permute(2, 0, 3, 1, 4)
    return qkv[1]


@pytest.mark.parametrize("c", [8, 24, 80])
@pytest.mark.parametrize("grid,window,stride,cu", CASES)
def test_kernel_matches_pytorch_convolutions(grid, window, stride, cu, c):
    """Values and both gradients equal PyTorch's grouped convolution (layout
    "channels_first") in float64, for a strided view and a contiguous copy of x. The head
    dims cover whole vector blocks, a partial tile of blocks and scalar tail channels at
    4, 8 and 16 lanes."""
    b, h, d = 2, 3, 5 if c == 24 else 4  # D = 5: a full tile of 4 patterns and a tile of 1
    if cu > 1:
        cu = c
    view = _qkv_view(b, h, math.prod(grid), c)
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(h, cu, d, *window, generator=gen, dtype=torch.float64)
    for x0 in (view, view.contiguous()):
        x, uu = x0.detach().requires_grad_(), u.clone().requires_grad_()
        ref = pattern_keys(x, uu, grid, stride, layout="channels_first")
        out = native_conv.pattern_keys_native(x, uu, grid, stride)
        assert out.shape == ref.shape and out.is_contiguous()
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
        g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        for got, want in zip(torch.autograd.grad(out, (x, uu), g), torch.autograd.grad(ref, (x, uu), g)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-11)


def test_gradcheck():
    x = _qkv_view(2, 2, 2 * 3 * 4, 3).detach().requires_grad_()
    u = torch.randn(2, 3, 2, 3, 3, 1, dtype=torch.float64, requires_grad=True)

    def fn(x, u):
        return native_conv.pattern_keys_native(x, u, (2, 3, 4), (2, 2, 1))

    assert torch.autograd.gradcheck(fn, (x, u))


def test_one_sided_gradients_and_empty_batch():
    x = torch.randn(2, 2, 12, 4, dtype=torch.float64)
    u = torch.randn(2, 4, 3, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    (gu,) = torch.autograd.grad(native_conv.pattern_keys_native(x, u, (1, 3, 4)).sum(), u)
    ref = pattern_keys(x, u, (1, 3, 4), layout="channels_first")
    torch.testing.assert_close(gu, torch.autograd.grad(ref.sum(), u)[0], rtol=0, atol=1e-12)
    xe = torch.randn(0, 2, 12, 4, dtype=torch.float64, requires_grad=True)
    out = native_conv.pattern_keys_native(xe, u, (1, 3, 4), (1, 2, 2))
    assert out.shape == (0, 2, 3 * 4, 4)
    gx, gu = torch.autograd.grad(out.sum(), (xe, u))
    assert gx.shape == xe.shape and torch.equal(gu, torch.zeros_like(gu))


def test_thread_counts_agree():
    """The weight gradient's batch groups depend on the thread count; the sums agree to rounding."""
    x = torch.randn(8, 3, 49, 16, requires_grad=True)
    u = torch.randn(3, 16, 4, 1, 3, 3, requires_grad=True)
    n = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = native_conv.pattern_keys_native(x, u, (1, 7, 7), (1, 2, 2))
            results.append((out, *torch.autograd.grad((out * out).sum(), (x, u))))
    finally:
        torch.set_num_threads(n)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert native_conv.weight_groups(8, 3, 4, 1) == 1 and native_conv.weight_groups(8, 1, 1, 2) == 8


def _op_args():
    x = _qkv_view(2, 2, 2 * 3 * 4, 3, seed=3).detach().requires_grad_()
    w = torch.randn(2, 2, 9, 3, dtype=torch.float64, requires_grad=True)
    return (x, w, [2, 3, 4], [1, 3, 3], [1, 2, 2])


def test_custom_op_passes_opcheck():
    """torch.library's own checks: schema, fake kernel against the real one, autograd registration."""
    torch.library.opcheck(torch.ops.structvit.pattern_conv_forward.default, _op_args())


def test_keyconv_runs_the_kernel_and_matches_naive():
    """keyconv picks the kernel on the CPU for float32 / float64 and is exact against the naive
    form for the paper's channel-wise layout, strided, with a value window of its own."""
    grid = (2, 5, 6)
    inputs = random_inputs(2, 2, grid, 4, 3, (3, 3, 3), layout="channel", window_v=(1, 3, 3), requires_grad=True)
    assert pattern_layout(inputs[1], inputs[3], grid, (1, 2, 2)) == "native"
    out = struct_attention(*inputs, grid, kv_stride=(1, 2, 2), backend="keyconv")
    ref = struct_attention(*inputs, grid, kv_stride=(1, 2, 2), backend="naive")
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    for g, r in zip(torch.autograd.grad(out.sum(), inputs), torch.autograd.grad(ref.sum(), inputs)):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10)


def test_fallbacks_where_the_kernel_cannot_run(monkeypatch):
    """bfloat16, ONNX export and the switch (STRUCTVIT_NATIVE_CONV=0) use PyTorch's
    convolutions, with the same values."""
    from structvit import config

    x = torch.randn(1, 2, 12, 4)
    u = torch.randn(2, 4, 2, 1, 3, 3)
    assert native_conv.serves(x) and not native_conv.serves(x.bfloat16())
    assert pattern_layout(x.bfloat16(), u.bfloat16(), (1, 3, 4), (1, 1, 1)) != "native"
    with_kernel = pattern_keys(x, u, (1, 3, 4), (1, 2, 2))
    saved = config.settings()
    monkeypatch.setenv("STRUCTVIT_NATIVE_CONV", "0")
    try:
        config.reload_from_environment()
        assert not native_conv.serves(x) and pattern_layout(x, u, (1, 3, 4), (1, 2, 2)) == "channels_last"
        torch.testing.assert_close(pattern_keys(x, u, (1, 3, 4), (1, 2, 2)), with_kernel, rtol=1e-6, atol=1e-6)
        config.set_native_conv(True)
        assert native_conv.serves(x)
        with pytest.raises(TypeError, match="enabled must be a bool"):
            config.set_native_conv(1)
    finally:
        config._settings = saved
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    assert not native_conv.serves(x)


def test_compile_export_and_flop_counter_see_the_kernel():
    from torch.utils.flop_counter import FlopCounterMode

    grid, stride = (1, 6, 6), (1, 2, 2)
    inputs = random_inputs(2, 2, grid, 8, 4, (1, 3, 3), layout="channel", dtype=torch.float32)

    def fn(q, k, v, u_k, u_v):
        return struct_attention(q, k, v, u_k, u_v, grid, kv_stride=stride, backend="keyconv")

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    out = torch.compile(fn, backend=backend, fullgraph=True)(*inputs)
    assert "pattern_conv_forward" in graphs[0].code
    torch.testing.assert_close(out, fn(*inputs), rtol=0, atol=1e-6)

    class Wrapper(torch.nn.Module):
        def forward(self, q, k, v, u_k, u_v):
            return fn(q, k, v, u_k, u_v)

    exported = torch.export.export(Wrapper(), tuple(inputs))
    assert "structvit.pattern_conv_forward" in str(exported.graph)
    with FlopCounterMode(display=False) as counter:
        fn(*inputs)
    counts = counter.get_flop_counts()["Global"]
    n_out = 3 * 3  # 6 x 6 at stride 2
    macs = 2 * 2 * 4 * n_out * 8 * 9  # (B, h, D, N', C) outputs of 9 multiply-adds each
    assert counts[torch.ops.structvit.pattern_conv_forward] == 2 * 2 * macs  # 2 FLOPs each, for K and for V
