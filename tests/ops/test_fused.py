"""The fused CPU kernel: exactness on the paths only it has, chunking, buffer reuse, and
the custom ops that make compile, export and the FLOP counter see the kernel."""
from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reference import random_inputs, reference_struct_attention
from structvit.nn import StructSA
from structvit.ops import cpuinfo, native, struct_attention
from structvit.ops.flops import fused_backward_flops, fused_forward_flops

NORMALIZE = ["joint", "per_pattern"]
fused_module = importlib.import_module("structvit.ops.backends.fused")  # (the package exports the function `fused`)
pytestmark = pytest.mark.skipif(not native.available(), reason="no C++ compiler for the fused CPU kernel")


def test_fused_limits():
    q, k, v, u_k, u_v = random_inputs(2, 3, (3, 4, 5), 4, 2, (3, 3, 3))
    with pytest.raises(ValueError, match="backend='fused' cannot serve this call: the kernel never stores the weights"):
        struct_attention(q, k, v, u_k, u_v, (3, 4, 5), backend="fused", return_weights=True)
    with pytest.raises(ValueError, match="backend='fused' cannot serve this call: it has no attention dropout"):
        struct_attention(q, k, v, u_k, u_v, (3, 4, 5), backend="fused", dropout_p=0.1)


def test_fused_kernel_shares_torch_openmp_runtime():
    """With the OpenMP build the kernel must bind to PyTorch's libgomp, never load a second
    runtime (two pools spinning against each other cost 10x); and it must then run with
    several threads and give the same result as with one."""
    shared = native.shares_torch_openmp()
    native.load()
    if shared:
        assert len(native._loaded_gomp()) == 1, native._loaded_gomp()
    q, k, v, u_k, u_v = random_inputs(2, 3, (3, 4, 5), 4, 2, (3, 3, 3), dtype=torch.float64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = struct_attention(q, k, v, u_k, u_v, (3, 4, 5), backend="fused")
        torch.set_num_threads(2)
        two = struct_attention(q, k, v, u_k, u_v, (3, 4, 5), backend="fused")
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(one, two, rtol=0, atol=1e-12)


def test_fused_chunks_cover_every_row_once():
    from structvit.ops.backends.fused import _chunks

    for bh, heads, n, limit in [(6, 3, 60, 10 ** 6), (6, 3, 60, 3 * 3600), (12, 3, 60, 7 * 3600), (6, 3, 60, 2520),
                                (4, 2, 60, 1), (5, 1, 7, 50)]:
        chunks = _chunks(bh, heads, n, limit)
        covered = torch.zeros(bh, n, dtype=torch.int64)
        for b0, b1, r0, r1 in chunks:
            covered[b0:b1, r0:r1] += 1
            # at most the limit (or one row), and head groups never split a batch item's heads
            assert (b1 - b0) * (r1 - r0) * n <= max(limit, n)
            assert b1 - b0 == 1 or (b0 % heads == 0 and (b1 - b0) % heads == 0 or b1 == bh)
        assert (covered == 1).all(), (bh, heads, n, limit)
    assert _chunks(6, 3, 60, 10 ** 6) == [(0, 6, 0, 60)]
    assert _chunks(12, 3, 60, 7 * 3600) == [(0, 6, 0, 60), (6, 12, 0, 60)]  # two batch items a chunk
    assert _chunks(6, 3, 60, 2520)[:2] == [(0, 1, 0, 42), (0, 1, 42, 60)]


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("chunk", [3 * 3600, 2520, 60, 1])  # head groups, row blocks, 1 row, (at least) 1 row
@pytest.mark.parametrize("kept", [0, 1, 2])
def test_fused_chunks_match_naive(shared, chunk, kept, monkeypatch):
    """Any chunking (whole batch items, single heads in row blocks, single rows), with the
    folded map (and S0) kept for backward or recomputed, gives the values and gradients of
    naive, with per-head and shared patterns."""
    monkeypatch.setattr(fused_module, "fused_plan", lambda *args: (chunk, kept))
    grid = (3, 4, 5)
    inputs = random_inputs(2, 3, grid, 4, 2, (3, 3, 3), shared=shared, requires_grad=True)
    out = struct_attention(*inputs, grid, backend="fused")
    ref = struct_attention(*inputs, grid, backend="naive")
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    g_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, g_out)
    grads_ref = torch.autograd.grad(ref, inputs, g_out)
    for name, g, r in zip(("q", "k", "v", "u_k", "u_v"), grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10, msg=name)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    rank=st.sampled_from([2, 3]),
    D=st.sampled_from([1, 2, 3, 4, 8]),
    width=st.integers(11, 18),
    shared=st.booleans(),
    normalize=st.sampled_from(NORMALIZE),
)
def test_fused_wide_grids_hypothesis(data, rank, D, width, shared, normalize):
    """Grid widths around 16, where the fused kernel widens its padded rows to whole
    register blocks (or not), against the naive form: values and all five gradients."""
    grid = tuple(data.draw(st.integers(1, 3), label=f"grid{i}") for i in range(rank - 1)) + (width,)
    window = tuple(data.draw(st.sampled_from([1, 3, 5]), label=f"window{i}") for i in range(rank))
    inputs = random_inputs(1, 2, grid, 3, D, window, shared=shared, seed=data.draw(st.integers(0, 2**16)),
                           requires_grad=True)
    out = struct_attention(*inputs, grid, normalize=normalize, backend="fused")
    ref = struct_attention(*inputs, grid, normalize=normalize, backend="naive")
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    g_out = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, inputs, g_out), torch.autograd.grad(ref, inputs, g_out)):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10)


@pytest.mark.parametrize("grid, window, D", [
    ((3, 14), (3, 3), 8),            # rows padded 16 wide: the block-row transposed convolution, 3 row shifts
    ((2, 3, 14), (3, 3, 3), 4),      # 9 row shifts
    ((2, 3, 12), (1, 5, 5), 2),      # 5 row shifts, column shifts of 2
    ((2, 16), (1, 1), 1),            # one row shift (identity window), rows widened 16 -> 16
    ((3, 13), (3, 3), 3),            # 15 -> 16 wide, D without a compiled special case (generic path)
    ((2, 2, 12), (3, 5, 5), 2),      # 15 row shifts: the direct transposed convolution on 16-wide rows
])
@pytest.mark.parametrize("normalize", ["joint", "per_pattern"])
def test_fused_wide_rows_match_naive(grid, window, D, normalize):
    """Grids whose padded rows are widened to whole register blocks (W + kw // 2 close to a
    multiple of 16) take other code paths in the kernel than the small grids above."""
    inputs = random_inputs(1, 2, grid, 4, D, window, requires_grad=True)
    out = struct_attention(*inputs, grid, normalize=normalize, backend="fused")
    ref, _ = reference_struct_attention(*[t.detach() for t in inputs], grid, normalize=normalize)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    g_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, g_out)
    naive = struct_attention(*inputs, grid, normalize=normalize, backend="naive")
    for name, g, r in zip(("q", "k", "v", "u_k", "u_v"), grads, torch.autograd.grad(naive, inputs, g_out)):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10, msg=name)
    # float32: the vectorised float kernel (exp polynomial, register tiles)
    out32 = struct_attention(*[t.detach().float() for t in inputs], grid, normalize=normalize, backend="fused")
    torch.testing.assert_close(out32.double(), ref, rtol=1e-5, atol=1e-6)


def test_fused_keeps_at_only_for_backward(monkeypatch):
    """At and S0 (B*h*N^2) are kept only when a backward can follow: not under no_grad, even with
    parameters (the patterns) that require grad, nor for inputs that need no grad."""
    seen = []
    forward = fused_module.fused_forward
    monkeypatch.setattr(fused_module, "fused_forward", lambda *args: seen.append(args[-1]) or forward(*args))
    q, k, v, u_k, u_v = random_inputs(1, 2, (3, 4), 4, 2, (3, 3))
    u_k.requires_grad_(True)
    struct_attention(q, k, v, u_k, u_v, (3, 4), backend="fused")
    with torch.no_grad():
        struct_attention(q, k, v, u_k, u_v, (3, 4), backend="fused")
    struct_attention(q, k, v, u_k.detach(), u_v, (3, 4), backend="fused")
    assert seen == [2, 0, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_padding_scores_above_the_maximum_stay_finite(dtype):
    """Scores at padding positions are computed (a block holds some) but are no part of the
    softmax; they may exceed the grid's maximum by far, e.g. when a pattern weighs one
    offset positively and the others negatively. The kernel's exp of those must not
    overflow into inf * 0 = NaN (found by the demo's training, not by random inputs)."""
    grid, c = (3, 4), 4
    q = torch.full((1, 1, 12, c), 40.0, dtype=torch.float64)
    k = q.clone()
    v = torch.randn(1, 1, 12, c, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u_k = -torch.ones(1, 1, 3, 3, dtype=torch.float64)
    u_k[..., 2, 2] = 1.0  # a padding corner sees only this offset: +3200, the grid at most -6400
    u_v = torch.rand(1, 1, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    inputs = [t.to(dtype).requires_grad_() for t in (q, k, v, u_k, u_v)]
    out = struct_attention(*inputs, grid, backend="fused")
    ref = struct_attention(*[t.detach().double() for t in inputs], grid, backend="naive")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in inputs)


def test_fused_kernel_std_thread_build(tmp_path):
    """The std::thread build (no OpenMP: other platforms, STRUCTVIT_NATIVE_OPENMP=0) gives the
    naive form's values and gradients with two threads and loads no OpenMP runtime."""
    import os
    import subprocess
    import sys

    code = """
import torch
from structvit.ops import native, struct_attention
from reference import random_inputs
torch.set_num_threads(2)
assert not native.shares_torch_openmp()
inputs = random_inputs(2, 3, (3, 4, 5), 4, 2, (3, 3, 3), requires_grad=True)
out = struct_attention(*inputs, (3, 4, 5), backend="fused")
ref = struct_attention(*inputs, (3, 4, 5), backend="naive")
torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
for g, r in zip(torch.autograd.grad(out.sum(), inputs), torch.autograd.grad(ref.sum(), inputs)):
    torch.testing.assert_close(g, r, rtol=0, atol=1e-10)
lib = open(native.load()._name, "rb").read()
assert b"GOMP_parallel" not in lib and b"omp_get" not in lib
print("ok")
"""
    env = dict(os.environ, STRUCTVIT_NATIVE_OPENMP="0", STRUCTVIT_CACHE=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=os.path.dirname(os.path.dirname(__file__)), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


def test_buffer_cache_reuses_only_free_buffers():
    """A buffer comes back only when no view of it is alive; the byte bound holds, and
    eviction takes the least recently used free buffer."""
    from structvit.ops.buffers import BufferCache

    cache = BufferCache(max_bytes=3 * 400)
    a = cache.take(100, torch.float32)
    a_ptr = a.data_ptr()
    b = cache.take(100, torch.float32)  # a is in use: a second buffer
    assert b.data_ptr() != a_ptr and cache.cached_bytes == 800
    view = a.view(10, 10)[2:]
    del a
    assert cache.take(100, torch.float32).data_ptr() != a_ptr  # a view of a is still alive
    del view
    assert cache.take(100, torch.float32).data_ptr() == a_ptr
    assert cache.take(100, torch.float64).dtype == torch.float64  # another dtype: a new buffer
    assert cache.cached_bytes <= 3 * 400
    assert cache.take(1000, torch.float32).numel() == 1000 and cache.cached_bytes <= 3 * 400  # over the bound
    off = BufferCache(max_bytes=0)
    off.take(10, torch.float32)
    assert off.cached_bytes == 0
    cache.clear()
    assert cache.cached_bytes == 0


def test_fused_retained_graph_keeps_its_buffers(monkeypatch):
    """A graph kept with retain_graph=True still holds the folded map it saved: calls in
    between (which reuse free cached buffers of the same size) must not overwrite it."""
    monkeypatch.setattr(fused_module, "fused_plan", lambda *args: (10 ** 9, 2))  # keep At and S0, one chunk
    grid = (2, 3, 4)
    inputs = random_inputs(1, 2, grid, 4, 2, (3, 3, 3), requires_grad=True)
    other = random_inputs(1, 2, grid, 4, 2, (3, 3, 3), requires_grad=True)
    out = struct_attention(*inputs, grid, backend="fused")
    g_out = torch.randn_like(out)
    first = torch.autograd.grad(out, inputs, g_out, retain_graph=True)
    for _ in range(2):  # forward and backward on other inputs of the same shapes
        y = struct_attention(*other, grid, backend="fused")
        torch.autograd.grad(y, other, torch.randn_like(y))
    second = torch.autograd.grad(out, inputs, g_out)
    ref = torch.autograd.grad(struct_attention(*inputs, grid, backend="naive"), inputs, g_out)
    for g1, g2, r in zip(first, second, ref):
        torch.testing.assert_close(g1, r, rtol=0, atol=1e-10)
        torch.testing.assert_close(g2, r, rtol=0, atol=1e-10)


def test_fused_reuses_cached_buffers(monkeypatch):
    """A second fwd+bwd of the same shapes takes its kept maps and chunk buffers from the
    cache (the cache does not grow), and gives the same result."""
    from structvit.ops.buffers import BufferCache

    cache = BufferCache(max_bytes=1 << 30)
    monkeypatch.setattr(fused_module, "CPU_BUFFERS", cache)
    monkeypatch.setattr(fused_module, "fused_plan", lambda *args: (2520, 2))  # row-block chunks, At and S0 kept
    grid = (3, 4, 5)
    inputs = random_inputs(2, 3, grid, 4, 2, (3, 3, 3), requires_grad=True)

    def run():
        out = struct_attention(*inputs, grid, backend="fused")
        return [out] + list(torch.autograd.grad(out, inputs, torch.ones_like(out)))

    first = run()
    cached = cache.cached_bytes
    assert cached >= 2 * 6 * 60 * 60 * 8  # the two kept (B*h, N, N) float64 maps at least
    second = run()
    assert cache.cached_bytes == cached
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)



# ----------------------------------------------------------------------------- custom ops


def _op_args(kept: int, joint: bool = True, dtype=torch.float64):
    grid = (2, 3, 4)
    q, k, v, u_k, u_v = random_inputs(2, 2, grid, 3, 2, (3, 3, 3), dtype=dtype, cv=5, requires_grad=True)
    return (q, k, v, u_k, u_v, list(grid), joint, 0.5, 1 << 20, kept)


@pytest.mark.parametrize("kept", [0, 1, 2])
@pytest.mark.parametrize("joint", [True, False])
def test_fused_custom_op_passes_opcheck(kept, joint):
    """torch.library's own checks: schema, fake kernel against the real one, autograd registration."""
    torch.library.opcheck(torch.ops.structvit.fused_forward.default, _op_args(kept, joint))


def _fused_layer():
    torch.manual_seed(0)
    return StructSA(32, 2, window=(3, 3, 3), num_patterns=2, patterns="head", backend="fused").double()


def test_fullgraph_compile_runs_the_fused_kernel():
    """torch.compile(fullgraph=True) of a StructSA layer on the fused kernel: no graph break,
    the kernel in the graph, values and gradients equal to eager."""
    layer, grid = _fused_layer(), (2, 3, 4)
    x = torch.randn(2, 24, 32, dtype=torch.float64, requires_grad=True)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    y = compiled(x, grid)
    assert "structvit.fused_forward" in str(graphs[0].graph) or "fused_forward" in graphs[0].code
    y_eager = layer(x, grid)
    torch.testing.assert_close(y, y_eager, rtol=0, atol=1e-12)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, layer.u_k], g)
    grads_eager = torch.autograd.grad(y_eager, [x, layer.u_k], g)
    for a, b in zip(grads, grads_eager):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_aot_autograd_compile_matches_eager():
    """The AOTAutograd path (what inductor builds on) traces forward and backward through the fake kernels."""
    layer, grid = _fused_layer(), (2, 3, 4)
    x = torch.randn(2, 24, 32, dtype=torch.float64, requires_grad=True)
    y = torch.compile(layer, backend="aot_eager", fullgraph=True)(x, grid)
    torch.testing.assert_close(y, layer(x, grid), rtol=0, atol=1e-12)
    (gx,) = torch.autograd.grad(y.sum(), x)
    (gx_eager,) = torch.autograd.grad(layer(x, grid).sum(), x)
    torch.testing.assert_close(gx, gx_eager, rtol=0, atol=1e-12)


@pytest.mark.slow
def test_inductor_compile_matches_eager():
    layer, grid = _fused_layer(), (2, 3, 4)
    x = torch.randn(2, 24, 32, dtype=torch.float64)
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x, grid), layer(x, grid), rtol=0, atol=1e-12)


def test_export_keeps_the_fused_kernel():
    layer, grid = _fused_layer(), (2, 3, 4)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x, grid)

    x = torch.randn(2, 24, 32, dtype=torch.float64)
    exported = torch.export.export(Wrapper(), (x,))
    assert "structvit.fused_forward" in str(exported.graph)
    torch.testing.assert_close(exported.module()(x), layer(x, grid), rtol=0, atol=1e-12)


def test_flop_counter_counts_the_fused_kernel():
    """FlopCounterMode sees the kernel (eager "auto" picks it here, so the counter counts
    what runs) and counts the folded form: 2 B h N^2 (C + Cv + 2 M D) forward."""
    from torch.utils.flop_counter import FlopCounterMode

    B, h, grid, C, Cv, D, window = 2, 2, (2, 3, 4), 3, 5, 2, (3, 3, 3)
    N, M = 24, 27
    inputs = random_inputs(B, h, grid, C, D, window, cv=Cv, dtype=torch.float32, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        out = struct_attention(*inputs, grid, backend="fused")
    counts = counter.get_flop_counts()["Global"]
    assert counts[torch.ops.structvit.fused_forward] == 2 * B * h * N * N * (C + Cv + 2 * M * D)
    assert counter.get_total_flops() == 2 * B * h * N * N * (C + Cv + 2 * M * D)
    assert fused_forward_flops((B, h, N, C), (B, h, N, Cv), (1, D) + window) == counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        out = struct_attention(*inputs, grid, backend="fused")
        out.sum().backward()
    backward = counter.get_flop_counts()["Global"][torch.ops.structvit.fused_backward]
    kept = fused_module.fused_plan(B * h, N, 4, None)[1]
    assert backward == fused_backward_flops((B, h, N, C), (B, h, N, Cv), (1, D) + window, kept >= 1, kept == 2)
    assert backward > counts[torch.ops.structvit.fused_forward]


def test_auto_runs_the_same_kernel_eager_compiled_and_counted():
    """The problem the custom ops fix: "auto" used to pick another backend under
    torch.compile and under the FLOP counter than in eager training."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    layer = StructSA(128, 2, window=(3, 3, 3), num_patterns=4, patterns="head")  # head dim 64: fused by cost
    x, grid = torch.randn(1, 2 * 5 * 5, 128), (2, 5, 5)
    layer(x, grid)
    assert layer.last_backend == "fused"
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    layer.last_backend = None
    torch.compile(layer, backend=backend, fullgraph=True)(x, grid)
    assert layer.last_backend == "fused" and "fused_forward" in graphs[0].code
    with FlopCounterMode(display=False) as counter:
        layer(x, grid)
    assert torch.ops.structvit.fused_forward in counter.get_flop_counts()["Global"]


def _isa_builds() -> list[str]:
    """Every build target this CPU can run: generic always, AVX2 (haswell) and AVX-512 where
    the CPU has them (x86-64 only)."""
    import platform

    flags = cpuinfo.cpu_flags()
    builds = ["generic"]
    if platform.machine() in ("x86_64", "AMD64"):
        if {"avx2", "fma"} <= flags:
            builds.append("haswell")
        if "avx512f" in flags:
            builds.append("x86-64-v4")
    return builds


_ISA_CHECK = """
import sys, torch
from structvit.ops import native, struct_attention
from reference import random_inputs
expected = sys.argv[1]
assert native.isa_name() == expected, (native.isa_name(), expected)
torch.set_num_threads(2)
cases = [((14, 14), (3, 3), 8, False), ((2, 7, 7), (3, 3, 3), 4, True), ((3, 9, 14), (1, 5, 5), 3, False),
         ((2, 5, 6), (3, 3, 3), 1, False), ((2, 6, 6), (3, 3, 3), 2, True), ((4, 6, 5), (5, 5, 5), 8, False)]
for grid, window, D, shared in cases:
    for normalize in ("joint", "per_pattern"):
        for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
            inputs = random_inputs(2, 2, grid, 16, D, window, shared=shared, dtype=dtype, requires_grad=True)
            ref_in = [t.detach().double().requires_grad_() for t in inputs]
            out = struct_attention(*inputs, grid, normalize=normalize, backend="fused")
            ref = struct_attention(*ref_in, grid, normalize=normalize, backend="naive")
            scale = float(ref.detach().abs().max())
            torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * scale)
            grads = torch.autograd.grad((out * out.detach()).sum(), inputs)
            refs = torch.autograd.grad((ref * ref.detach()).sum(), ref_in)
            for g, r in zip(grads, refs):
                torch.testing.assert_close(g.double(), r, rtol=tol, atol=tol * float(r.abs().max()))
# keyconv's pattern-convolution kernel, built for the same target (the paper's channel-wise layout)
from structvit.ops.backends.keyconv import pattern_layout
for grid, window, stride in (((1, 14, 14), (1, 3, 3), (1, 2, 2)), ((3, 7, 6), (3, 3, 3), (1, 1, 1)),
                             ((2, 5, 9), (1, 5, 5), (2, 2, 3))):
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        inputs = random_inputs(2, 2, grid, 24, 4, window, layout="channel", dtype=dtype, requires_grad=True)
        assert pattern_layout(inputs[1], inputs[3], grid, stride) == "native"
        ref_in = [t.detach().double().requires_grad_() for t in inputs]
        out = struct_attention(*inputs, grid, kv_stride=stride, backend="keyconv")
        ref = struct_attention(*ref_in, grid, kv_stride=stride, backend="naive")
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * float(ref.detach().abs().max()))
        grads = torch.autograd.grad((out * out.detach()).sum(), inputs)
        refs = torch.autograd.grad((ref * ref.detach()).sum(), ref_in)
        for g, r in zip(grads, refs):
            torch.testing.assert_close(g.double(), r, rtol=tol, atol=tol * float(r.abs().max()))
print("ok", native.build_isa())
"""


@pytest.mark.parametrize("arch", _isa_builds())
def test_every_isa_build_matches_naive(arch, tmp_path):
    """Each build this CPU can run (STRUCTVIT_NATIVE_ARCH: the portable one, AVX2 + FMA,
    AVX-512), with its own vector width and register tiles, gives the naive form's values and
    gradients: float64 to 1e-10, float32 to 1e-5 relative; grids whose rows are and are not
    whole vector blocks, 3x3 / 3x3x3 / 1x5x5 / 5x5x5 windows, D of 1, 2, 3 (the run-time D
    path), 4, 8, per-head and shared patterns, both softmaxes, two threads; and keyconv's
    pattern-convolution kernel (channel-wise, strided, 3x3 / 3x3x3 / 1x5x5)."""
    import os
    import subprocess
    import sys

    isa = {"generic": "generic", "haswell": "avx2", "x86-64-v4": "avx512"}[arch]
    env = dict(os.environ, STRUCTVIT_NATIVE_ARCH=arch, STRUCTVIT_CACHE=str(tmp_path), STRUCTVIT_AUTOTUNE="off")
    res = subprocess.run([sys.executable, "-c", _ISA_CHECK, isa], env=env, cwd=os.path.dirname(os.path.dirname(__file__)),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.startswith("ok"), res.stderr[-3000:]


def test_build_for_a_missing_isa_is_refused(monkeypatch, tmp_path):
    """A build whose vector ISA the CPU lacks is not loaded (it would die on an illegal
    instruction): here the CPU's flags are made to lack the loaded build's ISA."""
    from structvit import config

    saved = config.settings()
    try:
        config.set_cache_dir(tmp_path)
        config.set_native_arch("generic")
        native.reset()
        assert native.isa_name() == "generic"
        monkeypatch.setitem(native.ISA_CPU_FLAGS, "generic", ("not-a-real-flag",))
        native.reset()
        with pytest.warns(RuntimeWarning, match="lacks not-a-real-flag"):
            assert not native.available()
    finally:
        config._settings = saved
        native.reset()
