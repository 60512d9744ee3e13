"""Triton kernels of keyconv's pattern convolutions (structvit.ops.triton.pattern_conv).

On the CPU they run under Triton's interpreter, which must be switched on
(``TRITON_INTERPRET=1``) before Triton is first imported; timm and lightning import it, so
in a test session it is too late. ``test_triton_interpreted`` therefore runs the
``interp`` tests of every ``test_triton_*.py`` file in a subprocess with the variable set (they skip in any other process). The
``cuda`` tests run the compiled kernels where a GPU is present. All skip cleanly without Triton.
"""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed")
interp = pytest.mark.skipif(not (HAVE_TRITON and INTERPRETED),
                            reason="runs in test_triton_interpreted's subprocess (TRITON_INTERPRET=1)")
cuda = pytest.mark.skipif(not (HAVE_TRITON and torch.cuda.is_available()), reason="needs CUDA and Triton")

# (grid (T, H, W), window (kt, kh, kw), stride, pattern layout): image and video grids, odd
# sizes, stride 1 and 2 ((1, 2, 2) on video), channel-wise, per-head and shared patterns
CASES = [
    ((1, 5, 7), (1, 3, 3), (1, 1, 1), "channel"),
    ((1, 7, 5), (1, 5, 3), (1, 2, 2), "head"),
    ((1, 6, 5), (1, 3, 3), (1, 2, 1), "shared"),
    ((3, 5, 4), (3, 3, 3), (1, 2, 2), "channel"),
    ((3, 4, 5), (3, 3, 3), (2, 2, 2), "head"),
    ((2, 4, 3), (1, 3, 3), (1, 1, 1), "channel"),
]


def _inputs(grid, window, layout, dtype, device="cpu", b=2, h=2, c=4, d=3, seed=0):
    """k as the strided view of a qkv projection (B, h, N, C), and patterns (hu, cu, D, kt, kh, kw)."""
    gen = torch.Generator().manual_seed(seed)
    n = math.prod(grid)
    qkv = torch.randn(b, n, 3, h, c, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    x = qkv.permute(2, 0, 3, 1, 4)[1]
    hu, cu = {"channel": (h, c), "head": (h, 1), "shared": (1, 1)}[layout]
    u = (torch.randn(hu, cu, d, *window, generator=gen, dtype=torch.float64) / 3).to(device=device, dtype=dtype)
    return x, u


def _out_shape(x, u, grid, stride) -> tuple[int, ...]:
    """(B, h, D * N', C) of the pattern keys."""
    from structvit.ops.grid import strided_grid

    b, h, _, c = x.shape
    return (b, h, u.shape[2] * math.prod(strided_grid(grid, stride)), c)


def _values_and_grads(layout, x, u, grid, stride, weights):
    """The pattern keys in ``layout`` and the gradients of ``sum(y * weights)`` for x and u."""
    from structvit.ops.backends.keyconv import pattern_keys

    x, u = x.detach().requires_grad_(), u.detach().requires_grad_()
    y = pattern_keys(x, u, grid, stride, layout=layout)
    gx, gu = torch.autograd.grad((y * weights.to(y.dtype)).sum(), (x, u))
    return y, gx, gu


def _run_interpreted(marks: str) -> None:
    """Run the ``triton_interp_`` tests of every ``test_triton_*.py`` file with ``-m marks`` in a
    process that sets TRITON_INTERPRET=1 before anything imports Triton."""
    if not HAVE_TRITON:
        pytest.skip("Triton is not installed")
    if INTERPRETED:
        pytest.skip("this process is the interpreted run")
    env = dict(os.environ, TRITON_INTERPRET="1")
    files = sorted(str(p) for p in Path(__file__).parent.glob("test_triton_*.py"))  # the depthwise tests too
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, "-m", marks, "-k",
                           "triton_interp_", "-rs"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, proc.stdout[-3000:]


def test_triton_interpreted():
    """The interpreted tests (the kernels against PyTorch's convolutions), in their own process."""
    _run_interpreted("not slow")


@pytest.mark.slow
def test_triton_interpreted_slow():
    """The slow interpreted tests (a whole model on the Triton kernels), in their own process."""
    _run_interpreted("slow")


@interp
@pytest.mark.parametrize("grid, window, stride, layout", CASES)
def test_triton_interp_pattern_conv_matches_pytorch_conv(grid, window, stride, layout):
    """Values and both gradients equal PyTorch's grouped convolutions (keyconv's
    channels-first layout) in float64."""
    x, u = _inputs(grid, window, layout, torch.float64)
    weights = torch.randn(_out_shape(x, u, grid, stride), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = _values_and_grads("channels_first", x, u, grid, stride, weights)
    got = _values_and_grads("triton", x, u, grid, stride, weights)
    assert got[0].shape == ref[0].shape and got[0].is_contiguous()
    for name, g, r in zip(("y", "grad x", "grad u"), got, ref):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12, msg=name)


def _loop_reference(x, u, grid, window, stride):
    """y[b, h, d, j', c] = sum_o u[h, c, d, o] x[b, h, s j' + o - k // 2, c] in float64 loops."""
    from structvit.ops.grid import neighbour_index

    b, h, _, c = x.shape
    d = u.shape[2]
    index, valid = neighbour_index(grid, window, x.device, stride)  # (N', M)
    uf = u.double().expand(h, c, d, *window).flatten(3)  # (h, C, D, M)
    xn = x.double()[:, :, index] * valid[None, None, :, :, None]  # (B, h, N', M, C)
    return torch.einsum("bhjmc,hcdm->bhdjc", xn, uf).reshape(b, h, d * index.shape[0], c)


@interp
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_triton_interp_pattern_conv_low_precision(dtype, tol):
    """float32 / bfloat16 / float16 inputs (fp32 accumulation) against the float64 loop, relative
    to the largest value; gradients against float64 PyTorch convolutions of the same inputs."""
    grid, window, stride = (1, 5, 4), (1, 3, 3), (1, 2, 2)
    x, u = _inputs(grid, window, "channel", dtype)
    got = _values_and_grads("triton", x, u, grid, stride, torch.ones(1))
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == dtype
    ref_y = _loop_reference(x, u, grid, window, stride)
    ref = _values_and_grads("channels_first", x.double(), u.double(), grid, stride, torch.ones(1))
    for name, g, r in zip(("y", "grad x", "grad u"), (got[0], *got[1:]), (ref_y, *ref[1:])):
        rel = ((g.double() - r).abs().max() / r.abs().max()).item()
        assert rel < tol, f"{name}: relative error {rel:.2e} in {dtype}"


@interp
def test_triton_interp_pattern_conv_gradcheck():
    """gradcheck in float64 through the custom op and its registered autograd."""
    from structvit.ops.triton.pattern_conv import pattern_keys_triton

    grid, window, stride = (2, 3, 3), (3, 3, 1), (1, 2, 1)
    x, u = _inputs(grid, window, "head", torch.float64, b=1, h=2, c=2, d=2)
    x, u = x.detach().requires_grad_(), u.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, w: pattern_keys_triton(a, w, grid, stride), (x, u), fast_mode=True)


@interp
def test_triton_interp_pattern_conv_one_gradient_only():
    """The backward computes only the gradients asked for (the other comes back as zeros)."""
    from structvit.ops.triton.pattern_conv import kernel_weight, pattern_conv_backward

    grid, window, stride = (1, 4, 5), (1, 3, 3), (1, 1, 1)
    x, u = _inputs(grid, window, "channel", torch.float64)
    w = kernel_weight(u, 2, 4)
    gy = torch.randn(2, 2, 3 * 20, 4, dtype=torch.float64)
    gx_only, zero_w = pattern_conv_backward(gy, x, w, list(grid), list(window), list(stride), True, False)
    zero_x, gw_only = pattern_conv_backward(gy, x, w, list(grid), list(window), list(stride), False, True)
    gx, gw = pattern_conv_backward(gy, x, w, list(grid), list(window), list(stride), True, True)
    assert not zero_w.any() and not zero_x.any()
    torch.testing.assert_close(gx_only, gx, rtol=0, atol=0)
    torch.testing.assert_close(gw_only, gw, rtol=0, atol=0)
    assert gx.abs().sum() > 0 and gw.abs().sum() > 0


@interp
def test_triton_interp_pattern_conv_traceable():
    """torch.compile(fullgraph=True), torch.export and FlopCounterMode see the custom op."""
    from torch.utils.flop_counter import FlopCounterMode

    from structvit.ops.triton.pattern_conv import pattern_keys_triton

    grid, window, stride = (1, 4, 4), (1, 3, 3), (1, 2, 2)
    x, u = _inputs(grid, window, "channel", torch.float32)
    want = pattern_keys_triton(x, u, grid, stride)

    def fn(a, w):
        return pattern_keys_triton(a, w, grid, stride)

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="aot_eager")(x, u), want)

    class Keys(torch.nn.Module):
        def forward(self, a, w):
            return fn(a, w)

    exported = torch.export.export(Keys(), (x.contiguous(), u))
    assert any("triton_pattern_conv_forward" in str(node.target) for node in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(x.contiguous(), u), want)

    counter = FlopCounterMode(display=False)
    with counter:
        y = pattern_keys_triton(x, u.requires_grad_(), grid, stride)
        y.sum().backward()
    counts = counter.get_flop_counts()["Global"]
    one_pass = 2 * y.numel() * math.prod(window)
    assert counts[torch.ops.structvit.triton_pattern_conv_forward] == one_pass
    assert counts[torch.ops.structvit.triton_pattern_conv_backward] == one_pass  # only u needs a gradient


@needs_triton
def test_triton_pattern_conv_rejects_bad_arguments():
    from structvit.ops.triton.pattern_conv import conv_forward

    x = torch.zeros(1, 2, 12, 4)
    w = torch.zeros(2, 3, 9, 4)
    with pytest.raises(ValueError, match="grid"):
        conv_forward(x, w, [1, 3, 5], [1, 3, 3], [1, 1, 1])
    with pytest.raises(ValueError, match="w must be"):
        conv_forward(x, w[:, :, :4], [1, 3, 4], [1, 3, 3], [1, 1, 1])
    with pytest.raises(ValueError, match="window must be odd"):
        conv_forward(x, w[:, :, :6], [1, 3, 4], [1, 3, 2], [1, 1, 1])
    with pytest.raises(ValueError, match="x must be one of"):
        conv_forward(x.int(), w.int(), [1, 3, 4], [1, 3, 3], [1, 1, 1])


@cuda
@pytest.mark.parametrize("grid, window, stride, layout", CASES)
def test_triton_cuda_pattern_conv_matches_pytorch(grid, window, stride, layout):
    """On the GPU: the compiled kernels against PyTorch's convolutions (float64 tight, float32,
    bfloat16 loosely), and keyconv picks them for CUDA tensors unless switched off."""
    from structvit import config
    from structvit.ops.backends.keyconv import pattern_layout

    for dtype, atol in ((torch.float64, 1e-12), (torch.float32, 1e-4)):
        x, u = _inputs(grid, window, layout, dtype, device="cuda", b=3, h=3, c=40)
        weights = torch.randn(_out_shape(x, u, grid, stride), device="cuda", dtype=torch.float64)
        ref = _values_and_grads("channels_first", x, u, grid, stride, weights)
        got = _values_and_grads("triton", x, u, grid, stride, weights)
        for name, g, r in zip(("y", "grad x", "grad u"), got, ref):
            torch.testing.assert_close(g, r, rtol=1e-4 if dtype == torch.float32 else 0, atol=atol,
                                       msg=f"{name} {dtype}")
    x, u = _inputs(grid, window, layout, torch.bfloat16, device="cuda", b=3, h=3, c=40)
    got = _values_and_grads("triton", x, u, grid, stride, torch.ones(1, device="cuda"))
    ref = _values_and_grads("channels_first", x.double(), u.double(), grid, stride, torch.ones(1, device="cuda"))
    for name, g, r in zip(("y", "grad x", "grad u"), got, ref):
        rel = ((g.double() - r).abs().max() / r.abs().max()).item()
        assert rel < 2e-2, f"{name}: bfloat16 relative error {rel:.2e}"
    assert pattern_layout(x, u, grid, stride) == "triton"
    config.set_triton(False)
    try:
        assert pattern_layout(x, u, grid, stride) == "channels_first"
    finally:
        config.set_triton(True)


@cuda
def test_triton_cuda_keyconv_matches_naive():
    """struct_attention with keyconv (Triton) equals the naive backend on the GPU, with gradients."""
    from structvit.ops import struct_attention

    gen = torch.Generator().manual_seed(3)
    b, h, grid, c = 2, 3, (1, 7, 6), 32
    n = math.prod(grid)
    q, k, v = (torch.randn(b, h, n, c, generator=gen, dtype=torch.float64).cuda().requires_grad_() for _ in range(3))
    u_k = torch.randn(h, c, 4, 3, 3, generator=gen, dtype=torch.float64).cuda().requires_grad_()
    u_v = torch.randn(h, c, 4, 3, 3, generator=gen, dtype=torch.float64).cuda().requires_grad_()
    outs = []
    for backend in ("keyconv", "naive"):
        out = struct_attention(q, k, v, u_k, u_v, grid[1:], backend=backend)
        outs.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v, u_k, u_v))))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.slow  # a whole model under the interpreter: ~50 s
@interp
def test_triton_interp_model_with_triton_kernels(monkeypatch):
    """A StructViT model with every pattern and depthwise convolution on the Triton kernels (routed
    to them on CPU tensors here) computes what it computes with PyTorch's, with the gradients of
    the input and the patterns; torch.export traces it through dynamo (no graph break)."""
    import timm

    import structvit.models  # noqa: F401
    from structvit.nn import dwconv

    keyconv = importlib.import_module("structvit.ops.backends.keyconv")  # the package exports a function of that name
    torch.manual_seed(0)
    model = timm.create_model("structvit_tiny", backend="keyconv").double().eval()  # BatchNorm: 1x1 maps at 32x32
    patterns = [p for name, p in model.named_parameters() if name.endswith(("u_k", "u_v"))]
    for p in model.parameters():  # the depthwise weight gradients are tested in test_triton_dwconv.py
        p.requires_grad_(any(p is q for q in patterns))
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64, requires_grad=True)

    def run():
        y = model(x)
        return (y, *torch.autograd.grad(y.square().sum(), [x, *patterns]))

    want = run()
    monkeypatch.setattr(keyconv, "pattern_layout", lambda *args: "triton")
    monkeypatch.setattr(dwconv, "triton_serves", lambda t: True)
    got = run()
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, msg=f"output {i}")
    exported = torch.export.export(model, (x.detach(),), strict=True)
    targets = {str(node.target) for node in exported.graph.nodes}
    assert any("triton_pattern_conv_forward" in t for t in targets)
    assert any("triton_depthwise_conv_forward" in t for t in targets)


def test_triton_switch_reads_its_environment_variable(monkeypatch):
    """STRUCTVIT_TRITON / config.set_triton: validated, and off means PyTorch's convolutions."""
    from structvit import config
    from structvit.nn.dwconv import triton_serves

    keyconv = importlib.import_module("structvit.ops.backends.keyconv")
    monkeypatch.setenv("STRUCTVIT_TRITON", "sometimes")
    with pytest.raises(ValueError, match="STRUCTVIT_TRITON"):
        config.reload_from_environment()
    monkeypatch.setenv("STRUCTVIT_TRITON", "0")
    try:
        assert config.reload_from_environment().triton is False
    finally:
        monkeypatch.delenv("STRUCTVIT_TRITON")
        config.reload_from_environment()
    assert config.settings().triton is True
    with pytest.raises(TypeError, match="enabled must be a bool"):
        config.set_triton("yes")
    x = torch.zeros(1, 2, 4, 8)
    assert not keyconv.triton_serves(x) and not triton_serves(x)  # CPU tensors: never
