"""StructSA op: every backend against the loop-level ground truth, gradients, special cases, errors.

Fused-kernel specifics are in test_fused.py, backend choice in test_dispatch.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reference import random_inputs, reference_struct_attention
from structvit.ops import native, struct_attention
from structvit.ops.backends import correlation

# "fused" needs a C++ compiler to build its CPU kernel on first use; everything else always runs.
HAS_NATIVE = native.available()
BACKENDS = ["naive", "correlation", "keyconv", "auto"] + (["fused"] if HAS_NATIVE else [])
EXPLICIT = [b for b in BACKENDS if b != "auto"]
GENERAL = ["naive", "keyconv", "auto"]  # the backends that serve every case
NORMALIZE = ["joint", "per_pattern"]
LAYOUTS = ["channel", "head", "shared"]


def serving(layout: str, strided: bool = False, same_window: bool = True) -> list[str]:
    """The backends that serve a call of this kind."""
    return BACKENDS if layout != "channel" and not strided and same_window else GENERAL


# (grid, window): images and video, windows up to 5x5x5, grids smaller than the window.
CASES = [
    ((3, 4), (3, 3)),
    ((5, 5), (1, 1)),
    ((2, 2), (5, 5)),
    ((1, 6), (3, 5)),
    ((2, 3, 3), (3, 3, 3)),
    ((3, 2, 2), (1, 3, 3)),
    ((2, 2, 3), (5, 5, 5)),
    ((4, 1, 1), (3, 1, 1)),
]


@pytest.mark.parametrize("grid,window", CASES)
@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("D,layout", [(1, "head"), (2, "shared"), (8, "head"), (1, "channel"), (3, "channel")])
def test_backends_match_reference_float64(grid, window, normalize, D, layout):
    q, k, v, u_k, u_v = random_inputs(2, 2, grid, 4, D, window, layout=layout)
    ref, _ = reference_struct_attention(q, k, v, u_k, u_v, grid, normalize)
    for backend in serving(layout):
        out = struct_attention(q, k, v, u_k, u_v, grid, normalize=normalize, backend=backend)
        assert out.shape == ref.shape and out.dtype == torch.float64
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-10, msg=f"{backend} differs from the reference")


@pytest.mark.parametrize("grid,window,window_v,stride", [
    ((5, 6), (3, 3), (3, 3), 2),
    ((5, 6), (3, 3), (5, 5), 1),
    ((7, 4), (3, 3), (1, 1), (3, 2)),
    ((3, 5, 6), (3, 3, 3), (3, 3, 3), (1, 2, 2)),
    ((4, 3, 5), (3, 3, 3), (1, 5, 3), (2, 1, 3)),
])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("normalize", NORMALIZE)
def test_stride_and_value_window_match_reference(grid, window, window_v, stride, layout, normalize):
    q, k, v, u_k, u_v = random_inputs(2, 2, grid, 3, 2, window, layout=layout, window_v=window_v, cv=5)
    ref, ref_w = reference_struct_attention(q, k, v, u_k, u_v, grid, normalize, kv_stride=stride)
    for backend in GENERAL:
        out, w = struct_attention(q, k, v, u_k, u_v, grid, kv_stride=stride, normalize=normalize, backend=backend,
                                  return_weights=True)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-10, msg=backend)
        torch.testing.assert_close(w, ref_w, rtol=0, atol=1e-12, msg=backend)


def test_strided_key_count():
    """D * prod(ceil(n / s)) keys: the positions a convolution with padding m // 2 and stride s visits."""
    grid, stride = (3, 7, 5), (2, 3, 2)
    q, k, v, u_k, u_v = random_inputs(1, 1, grid, 2, 3, (3, 3, 3), layout="channel")
    _, w = struct_attention(q, k, v, u_k, u_v, grid, kv_stride=stride, return_weights=True)
    assert w.shape == (1, 1, 105, 3, 2 * 3 * 3)


@pytest.mark.parametrize("value_side", ["folded", "shifted"])
@pytest.mark.parametrize("grid,window", [((3, 4), (3, 3)), ((2, 3, 3), (3, 3, 3))])
def test_correlation_value_sides_match_reference(grid, window, value_side):
    q, k, v, u_k, u_v = random_inputs(1, 2, grid, 4, 3, window)
    ref, _ = reference_struct_attention(q, k, v, u_k, u_v, grid)
    uk, uv = (u.reshape(2, 1, 3, *((1,) * (3 - len(grid)) + window)) for u in (u_k, u_v))
    grid3 = (1,) * (3 - len(grid)) + grid
    out, _ = correlation(q, k, v, uk, uv, grid3, (1, 1, 1), "joint", 4 ** -0.5, 0.0, False, value_side=value_side)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    rank=st.sampled_from([2, 3]),
    D=st.sampled_from([1, 2, 8]),
    heads=st.integers(1, 3),
    C=st.integers(1, 6),
    cv=st.integers(1, 5),
    B=st.integers(1, 2),
    layout=st.sampled_from(LAYOUTS),
    normalize=st.sampled_from(NORMALIZE),
)
def test_backends_match_reference_hypothesis(data, rank, D, heads, C, cv, B, layout, normalize):
    grid = tuple(data.draw(st.integers(1, 4), label=f"grid{i}") for i in range(rank))
    window = tuple(data.draw(st.sampled_from([1, 3, 5]), label=f"window{i}") for i in range(rank))
    window_v = data.draw(st.sampled_from([window, tuple(reversed(window))]), label="window_v")
    stride = tuple(data.draw(st.integers(1, 3), label=f"stride{i}") for i in range(rank))
    q, k, v, u_k, u_v = random_inputs(B, heads, grid, C, D, window, layout=layout, cv=cv, window_v=window_v,
                                      seed=data.draw(st.integers(0, 2**16)))
    ref, ref_w = reference_struct_attention(q, k, v, u_k, u_v, grid, normalize, kv_stride=stride)
    strided = any(s > 1 for s in stride)
    for backend in serving(layout, strided, window_v == window):
        out = struct_attention(q, k, v, u_k, u_v, grid, kv_stride=stride, normalize=normalize, backend=backend)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    _, w = struct_attention(q, k, v, u_k, u_v, grid, kv_stride=stride, normalize=normalize, return_weights=True)
    torch.testing.assert_close(w, ref_w, rtol=0, atol=1e-10)


@pytest.mark.parametrize("grid,window", [((5, 6), (3, 3)), ((3, 4, 4), (3, 3, 3)), ((2, 4, 3), (1, 5, 5))])
@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("layout,stride", [("head", 1), ("channel", 1), ("channel", 2)])
def test_backends_float32_relative_error(grid, window, normalize, layout, stride):
    q, k, v, u_k, u_v = random_inputs(2, 3, grid, 8, 8, window, layout=layout)
    ref, _ = reference_struct_attention(q, k, v, u_k, u_v, grid, normalize, kv_stride=stride)
    for backend in serving(layout, stride > 1):
        out = struct_attention(*(t.float() for t in (q, k, v, u_k, u_v)), grid, kv_stride=stride, normalize=normalize,
                               backend=backend)
        assert out.dtype == torch.float32
        rel = ((out.double() - ref).abs().max() / ref.abs().max()).item()
        assert rel <= 1e-5, f"{backend}: relative error {rel:.2e}"


@pytest.mark.parametrize("backend,layout", [(b, lay) for lay in ("head", "channel") for b in serving(lay)])
def test_bfloat16_runs_and_is_close(backend, layout):
    grid, window = (2, 4, 4), (3, 3, 3)
    q, k, v, u_k, u_v = random_inputs(1, 2, grid, 8, 4, window, layout=layout)
    ref, _ = reference_struct_attention(q, k, v, u_k, u_v, grid)
    args = [t.bfloat16().requires_grad_() for t in (q, k, v, u_k, u_v)]
    out = struct_attention(*args, grid, backend=backend)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(a.grad is not None and a.grad.dtype == torch.bfloat16 for a in args)
    rel = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    assert rel < 5e-2, f"{backend}: bf16 relative error {rel:.2e}"


def test_autocast_patterns_follow_q():
    """Under autocast the projections give bf16 q, k, v while the patterns stay float32
    parameters: the op casts them (outside autocast a dtype mismatch is an error)."""
    q, k, v, u_k, u_v = random_inputs(1, 2, (3, 4), 4, 2, (3, 3), layout="channel", dtype=torch.float32)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = struct_attention(qb, kb, vb, u_k, u_v, (3, 4))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), struct_attention(q, k, v, u_k, u_v, (3, 4)), rtol=5e-2, atol=5e-2)
    with pytest.raises(TypeError, match="u_k must have the dtype of q"):
        struct_attention(qb, kb, vb, u_k, u_v, (3, 4))


GRADCHECK_CASES = [  # grid, window, layout, window_v, stride
    ((3, 3), (3, 3), "head", None, 1),
    ((2, 2, 2), (3, 1, 3), "shared", None, 1),
    ((3, 4), (3, 3), "channel", None, 1),
    ((2, 2, 3), (3, 3, 3), "channel", (1, 3, 1), (1, 1, 2)),
    ((4, 3), (3, 3), "head", (1, 3), 2),
    ((3, 4), (1, 3), "shared", (3, 1), (2, 1)),
]


@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("backend,grid,window,layout,window_v,stride", [
    (b, *case) for case in GRADCHECK_CASES for b in EXPLICIT if b in serving(case[2], case[4] != 1, case[3] is None)])
def test_gradcheck(backend, normalize, grid, window, layout, window_v, stride):
    inputs = random_inputs(1, 2, grid, 3, 2, window, layout=layout, window_v=window_v, requires_grad=True)
    def fn(q, k, v, u_k, u_v):
        return struct_attention(q, k, v, u_k, u_v, grid, kv_stride=stride, normalize=normalize, backend=backend)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("layout", ["head", "channel"])
def test_gradients_agree_across_backends(layout):
    grid, window = (2, 3, 3), (3, 3, 3)
    grads = {}
    backends = [b for b in serving(layout) if b != "auto"]
    for backend in backends:
        inputs = random_inputs(2, 2, grid, 4, 3, window, layout=layout, requires_grad=True)
        out = struct_attention(*inputs, grid, backend=backend)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads[backend] = [t.grad for t in inputs]
    for backend in backends[1:]:
        for g, g_ref in zip(grads[backend], grads["naive"]):
            torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- special cases


@pytest.mark.parametrize("grid", [(4, 5), (2, 3, 4)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_patterns_equal_sdpa(grid, backend):
    """D = 1 with a 1x1(x1) window of value 1 is plain scaled dot-product attention, in every layout."""
    q, k, v, _, _ = random_inputs(2, 3, grid, 8, 1, (1,) * len(grid))
    ones = {"shared": torch.ones((1,) + (1,) * len(grid), dtype=torch.float64),
            "head": torch.ones((3, 1) + (1,) * len(grid), dtype=torch.float64),
            "channel": torch.ones((3, 8, 1) + (1,) * len(grid), dtype=torch.float64)}
    for layout, one in ones.items():
        if backend not in serving(layout):
            continue
        for normalize in NORMALIZE:
            out = struct_attention(q, k, v, one, one, grid, normalize=normalize, backend=backend)
            torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=0, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sa_equivalent_patterns_equal_sdpa(layout):
    """u_k[d] = delta, u_v[d] = delta + e_d with sum_d e_d = 0 (joint) is SA for any D."""
    grid, window, D = (3, 4), (3, 3), 5
    q, k, v, u_k, u_v = random_inputs(1, 2, grid, 8, D, window, layout=layout)
    delta = torch.zeros(window, dtype=torch.float64)
    delta[1, 1] = 1
    d_dim = u_k.dim() - 3
    u_k = delta.expand_as(u_k).clone()
    e = torch.randn_like(u_v)
    u_v = delta + e - e.mean(d_dim, keepdim=True)
    for backend in serving(layout):
        out = struct_attention(q, k, v, u_k, u_v, grid, backend=backend)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=0, atol=1e-12)


def test_convsa_equals_hand_written_correlation_convolution():
    """Dot-product ConvSA (D = 1): conv of each query's H x W correlation map, softmax, then a conv kernel on values."""
    H, W, C = 4, 5, 6
    q, k, v, u_k, u_v = random_inputs(1, 1, (H, W), C, 1, (3, 3))
    corr = (q[0, 0] @ k[0, 0].T) * C ** -0.5  # (N, N)
    scores = F.conv2d(corr.reshape(H * W, 1, H, W), u_k.reshape(1, 1, 3, 3), padding=1).reshape(H * W, H * W)
    attn = scores.softmax(-1)
    # y_i = sum_j A[i, j] sum_o u_v[o] v_{j+o}: a 3x3 conv of the value map, then attention.
    v_map = v[0, 0].T.reshape(C, 1, H, W)
    v_conv = F.conv2d(v_map, u_v.reshape(1, 1, 3, 3), padding=1).reshape(C, H * W).T
    expected = attn @ v_conv
    for backend in BACKENDS:
        out = struct_attention(q, k, v, u_k, u_v, (H, W), backend=backend)
        torch.testing.assert_close(out[0, 0], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("stride", [1, 2])
def test_channelwise_convsa_is_attention_over_depthwise_convolved_keys(stride):
    """Channel-wise D = 1 is the ConvSA of CvT/MViT: depthwise convolutions (one filter per
    channel, stride s) of the key and value maps, then ordinary attention over them."""
    B, heads, H, W, C = 2, 2, 5, 6, 3
    q, k, v, u_k, u_v = random_inputs(B, heads, (H, W), C, 1, (3, 3), layout="channel", window_v=(5, 5))

    def depthwise(x, u, pad):  # x (B, heads, N, C); u (heads, C, 1, kh, kw)
        maps = x.transpose(-1, -2).reshape(B, heads * C, H, W)
        y = F.conv2d(maps, u.reshape(heads * C, 1, *u.shape[-2:]), stride=stride, padding=pad, groups=heads * C)
        return y.reshape(B, heads, C, -1).transpose(-1, -2)

    expected = F.scaled_dot_product_attention(q, depthwise(k, u_k, 1), depthwise(v, u_v, 2))
    for backend in GENERAL:
        out = struct_attention(q, k, v, u_k, u_v, (H, W), kv_stride=stride, backend=backend)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("layout", ["head", "shared"])
def test_dot_product_is_channelwise_with_broadcast_filters(layout):
    """The dot-product layouts are the channel-wise one with each filter repeated over a head's channels."""
    grid, heads, C, D = (2, 3, 4), 2, 4, 3
    q, k, v, u_k, u_v = random_inputs(1, heads, grid, C, D, (3, 3, 3), layout=layout)

    def broadcast(u):
        per_head = u if layout == "head" else u.expand(heads, *u.shape)
        return per_head.unsqueeze(1).expand(heads, C, *per_head.shape[1:]).contiguous()

    channelwise = struct_attention(q, k, v, broadcast(u_k), broadcast(u_v), grid, backend="keyconv")
    for backend in serving(layout):
        torch.testing.assert_close(struct_attention(q, k, v, u_k, u_v, grid, backend=backend), channelwise,
                                   rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend,layout", [(b, lay) for lay in ("head", "channel") for b in serving(lay)
                                            if b != "fused"])
def test_return_weights(backend, layout):
    grid = (2, 3, 3)
    q, k, v, u_k, u_v = random_inputs(2, 2, grid, 4, 3, (3, 3, 3), layout=layout)
    for normalize in NORMALIZE:
        out, w = struct_attention(q, k, v, u_k, u_v, grid, normalize=normalize, backend=backend, return_weights=True)
        ref, ref_w = reference_struct_attention(q, k, v, u_k, u_v, grid, normalize)
        assert w.shape == (2, 2, 18, 3, 18)
        torch.testing.assert_close(w, ref_w, rtol=0, atol=1e-12)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
        sums = w.sum((-2, -1)) if normalize == "joint" else w.sum(-1)
        torch.testing.assert_close(sums, torch.ones_like(sums))


@pytest.mark.parametrize("backend", ["naive", "correlation", "keyconv"])
def test_dropout_is_unbiased(backend):
    """Dropout on the attention weights: outputs change, their mean over masks does not."""
    grid = (3, 3)
    q, k, v, u_k, u_v = random_inputs(1, 1, grid, 4, 2, (3, 3))
    clean = struct_attention(q, k, v, u_k, u_v, grid, backend=backend)
    torch.manual_seed(0)
    reps = 3000  # independent masks: the batch holds copies of the same input
    runs = struct_attention(*(t.expand(reps, -1, -1, -1) for t in (q, k, v)), u_k, u_v, grid, backend=backend,
                            dropout_p=0.3)
    assert (runs[0] - clean[0]).abs().max() > 1e-3
    assert (runs.mean(0) - clean[0]).abs().max() < 0.1 * clean.abs().max()


def test_scale_argument():
    grid = (3, 4)
    for layout in LAYOUTS:
        q, k, v, u_k, u_v = random_inputs(1, 2, grid, 4, 2, (3, 3), layout=layout)
        ref, _ = reference_struct_attention(q, k, v, u_k, u_v, grid, scale=0.3)
        for backend in serving(layout):
            out = struct_attention(q, k, v, u_k, u_v, grid, backend=backend, scale=0.3)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout,stride", [("head", 1), ("channel", 1), ("channel", 2)])
def test_cuda_matches_cpu(dtype, layout, stride):
    grid = (4, 6, 6)
    q, k, v, u_k, u_v = random_inputs(2, 3, grid, 16, 4, (3, 3, 3), layout=layout)
    ref, _ = reference_struct_attention(q, k, v, u_k, u_v, grid, kv_stride=stride)
    for backend in [b for b in ["correlation", "keyconv", "auto"] if b in serving(layout, stride > 1)]:
        out = struct_attention(*(t.cuda().to(dtype) for t in (q, k, v, u_k, u_v)), grid, kv_stride=stride,
                               backend=backend)
        rel = ((out.double().cpu() - ref).abs().max() / ref.abs().max()).item()
        assert rel < (1e-4 if dtype == torch.float32 else 5e-2)


@pytest.mark.parametrize("layout,stride", [("head", 1), ("channel", 1), ("shared", 2)])
def test_empty_batch_gives_an_empty_result(layout, stride):
    """B = 0 returns (0, heads, N, Cv) (and empty weights) from every backend that serves the
    call, and backward runs, giving zero pattern gradients."""
    _, _, _, u_k, u_v = random_inputs(1, 2, (3, 4), 4, 2, (3, 3), layout=layout)
    u_k.requires_grad_(True)
    q = torch.zeros(0, 2, 12, 4, dtype=torch.float64, requires_grad=True)
    for backend in serving(layout, stride > 1):
        out = struct_attention(q, q, q, u_k, u_v, (3, 4), kv_stride=stride, backend=backend)
        assert out.shape == (0, 2, 12, 4)
        (g,) = torch.autograd.grad(out.sum(), u_k)
        assert g.shape == u_k.shape and not g.any()
        if backend != "fused":
            _, w = struct_attention(q, q, q, u_k, u_v, (3, 4), kv_stride=stride, backend=backend, return_weights=True)
            assert w.shape == (0, 2, 12, 2, 12 if stride == 1 else 4)


# ----------------------------------------------------------------------------- errors


def _good(**overrides):
    q, k, v, u_k, u_v = random_inputs(2, 2, (3, 4), 4, 2, (3, 3), dtype=torch.float32)
    args = dict(q=q, k=k, v=v, u_k=u_k, u_v=u_v, grid=(3, 4))
    args.update(overrides)
    return args


def _call(args, **kwargs):
    return struct_attention(args["q"], args["k"], args["v"], args["u_k"], args["u_v"], args["grid"], **kwargs)


@pytest.mark.parametrize("overrides,kwargs,error,match", [
    (dict(k=torch.randn(2, 2, 12, 5)), {}, ValueError, r"k must have the shape of q"),
    (dict(v=torch.randn(2, 3, 12, 4)), {}, ValueError, r"v must have shape \(B, heads, N, Cv\)"),
    (dict(q=torch.randn(2, 12, 4)), {}, ValueError, r"q must have shape \(B, heads, N, C\)"),
    (dict(grid=(3, 5)), {}, ValueError, r"grid=\(3, 5\) has 15 positions but the inputs have N=12"),
    (dict(grid=(12,)), {}, ValueError, r"grid must be \(H, W\) or \(T, H, W\)"),
    (dict(grid=(3, 4.0)), {}, ValueError, r"grid sizes must be positive ints"),
    (dict(u_k=torch.randn(2, 2, 2, 3), u_v=torch.randn(2, 2, 2, 3)), {}, ValueError, r"u_k window sizes must be odd"),
    (dict(u_k=torch.randn(2, 2, 1, 1, 3, 3)), {}, ValueError,
     r"u_k must have shape \(heads, C, D, kh, kw\) \(channel-wise\), \(heads, D, kh, kw\) \(per head\) or \(D, kh, kw\)"),
    (dict(u_v=torch.randn(2, 3, 3)), {}, ValueError, r"u_k and u_v must use the same layout"),
    (dict(u_v=torch.randn(2, 3, 3, 3)), {}, ValueError, r"u_k and u_v must have the same number of patterns D, got 2 and 3"),
    (dict(u_k=torch.randn(3, 2, 3, 3), u_v=torch.randn(3, 2, 3, 3)), {}, ValueError, r"has 3 heads, but q has 2 heads"),
    (dict(u_k=torch.randn(2, 5, 2, 3, 3), u_v=torch.randn(2, 5, 2, 3, 3)), {}, ValueError,
     r"u_k of shape \(2, 5, 2, 3, 3\) is read as \(heads, C, D, kh, kw\) and has 5 channels, but the head width"),
    (dict(q=torch.ones(2, 2, 12, 4, dtype=torch.int64)), {}, TypeError, r"q must be a floating-point tensor"),
    (dict(u_v=torch.ones(2, 2, 3, 3, dtype=torch.int32)), {}, TypeError, r"u_v must be a floating-point tensor"),
    (dict(v=torch.randn(2, 2, 12, 4, dtype=torch.float64)), {}, TypeError, r"v must have the dtype of q"),
    (dict(q=[[1.0]]), {}, TypeError, r"q must be a torch.Tensor"),
    ({}, dict(normalize="softmax"), ValueError, r"normalize must be one of"),
    ({}, dict(backend="flash"), ValueError, r"backend must be one of"),
    ({}, dict(scale=-1.0), ValueError, r"scale must be a finite positive number"),
    ({}, dict(scale=0.0), ValueError, r"scale must be a finite positive number"),
    ({}, dict(scale=float("inf")), ValueError, r"scale must be a finite positive number or None, got inf"),
    ({}, dict(scale=float("nan")), ValueError, r"scale must be a finite positive number or None, got nan"),
    ({}, dict(scale=True), ValueError, r"scale must be a finite positive number"),
    (dict(q=torch.randn(2, 2, 12, 0), k=torch.randn(2, 2, 12, 0)), {}, ValueError,
     r"q must have at least one head and a head dim of at least 1, got shape \(2, 2, 12, 0\)"),
    (dict(v=torch.randn(2, 2, 12, 0)), {}, ValueError, r"v must have at least one head and a head dim of at least 1"),
    ({}, dict(dropout_p=1.5), ValueError, r"dropout_p must be in \[0, 1\)"),
    ({}, dict(kv_stride=0), ValueError, r"kv_stride must be a positive int or 2 positive ints"),
    ({}, dict(kv_stride=(1, 2, 2)), ValueError, r"kv_stride must be a positive int or 2 positive ints"),
    ({}, dict(memory_limit=1.5), ValueError, r"memory_limit must be a positive int"),
])
def test_bad_input_errors(overrides, kwargs, error, match):
    with pytest.raises(error, match=match):
        _call(_good(**overrides), **kwargs)


@pytest.mark.parametrize("backend", ["correlation", "fused"])
@pytest.mark.parametrize("case", ["channel", "stride", "window_v"])
def test_backends_that_cannot_serve_say_why(backend, case):
    args = _good()
    kwargs = {}
    if case == "channel":
        args["u_k"], args["u_v"] = torch.randn(2, 4, 2, 3, 3), torch.randn(2, 4, 2, 3, 3)
        match = "not channel-wise"
    elif case == "stride":
        kwargs["kv_stride"] = 2
        match = "kv_stride=1 only"
    else:
        args["u_v"] = torch.randn(2, 2, 5, 5)
        match = "key and value windows to be equal"
    with pytest.raises(ValueError, match=rf"backend='{backend}' cannot serve this call: .*{match}"):
        _call(args, backend=backend, **kwargs)


def test_video_grid_needs_3d_window():
    args = _good(q=torch.randn(1, 2, 12, 4), k=torch.randn(1, 2, 12, 4), v=torch.randn(1, 2, 12, 4), grid=(3, 2, 2))
    # a per-head 2-D window (heads, D, kh, kw) reads as (D, kt, kh, kw) on a 3-D grid: the message says so
    with pytest.raises(ValueError, match=r"u_k window sizes must be odd.*read as \(D, kt, kh, kw\) for a 3-D grid"):
        _call(args)
    args["u_k"] = args["u_v"] = torch.randn(3, 3)
    with pytest.raises(ValueError, match=r"u_k must have shape .*\(D, kt, kh, kw\) \(shared\) for a 3-D grid"):
        _call(args)


# ----------------------------------------------------------------------------- keyconv layouts


@pytest.mark.parametrize("grid,window,stride", [
    ((1, 5, 6), (1, 3, 3), (1, 1, 1)),
    ((1, 5, 6), (3, 3, 5), (1, 2, 3)),  # an image with a kt > 1 window: only the centre slice counts
    ((3, 4, 5), (3, 3, 3), (1, 1, 1)),
    ((3, 4, 5), (1, 5, 3), (2, 2, 1)),
    ((3, 4, 5), (3, 3, 3), (1, 2, 2)),
    ((2, 1, 1), (3, 1, 1), (1, 1, 1)),
])
@pytest.mark.parametrize("cu", [1, 3])
def test_pattern_keys_layouts_match_a_loop(grid, window, stride, cu):
    """Every convolution layout of keyconv gives x^d_{j'c} = sum_o u[h, c, d, o] x_{s j' + o, c} in
    the pattern-major (B, h, D * N', C) order with unit stride in C, values and gradients (float64)."""
    from reference import neighbours
    from structvit.ops.backends.keyconv import LAYOUTS, pattern_keys, pattern_layout

    b, h, c, d = 2, 2, 3, 2
    n = grid[0] * grid[1] * grid[2]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(b, h, n, c, generator=gen, dtype=torch.float64, requires_grad=True)
    u = torch.randn(h, cu, d, *window, generator=gen, dtype=torch.float64, requires_grad=True)
    uf = u.flatten(3).expand(h, c, d, -1)  # (h, C, D, M)
    rows = []
    for row in neighbours(grid, window, stride):  # the kept key positions j' and their (o, s j' + o)
        acc = torch.zeros(b, h, d, c, dtype=torch.float64)
        for m, i in row:
            acc = acc + uf[None, :, :, :, m].transpose(-1, -2) * x[:, :, i, None, :]
        rows.append(acc)
    ref = torch.stack(rows, 3).flatten(2, 3)  # (B, h, D * N', C)
    ref_grads = torch.autograd.grad((ref * torch.arange(ref.numel()).reshape(ref.shape).sin()).sum(), (x, u))
    from structvit.ops.backends import native_conv

    layouts = [lay for lay in LAYOUTS if (lay != "spatial_c" or (cu == 1 and grid[0] == 1))
               and (lay != "native" or native_conv.serves(x)) and lay != "triton"]  # triton: test_triton_conv.py
    assert len(layouts) == (3 if cu == 1 and grid[0] == 1 else 2) + native_conv.serves(x)
    for layout in layouts:
        out = pattern_keys(x, u, grid, stride, layout=layout)
        assert out.shape == ref.shape and out.stride(-1) == 1, layout
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-10, msg=f"layout {layout}")
        grads = torch.autograd.grad((out * torch.arange(out.numel()).reshape(out.shape).sin()).sum(), (x, u))
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=0, atol=1e-10, msg=f"layout {layout} gradient")
    # bfloat16 in the layout keyconv picks for it: the CPU's bf16 convolutions give wrong weight
    # gradients for some input layouts (a channels-last video input with H = W = 1)
    xb, ub = (t.detach().bfloat16().requires_grad_() for t in (x, u))
    outb = pattern_keys(xb, ub, grid, stride)
    gradsb = torch.autograd.grad((outb.double() * torch.arange(outb.numel()).reshape(outb.shape).sin()).sum(), (xb, ub))
    for got, want in zip((outb, *gradsb), (ref, *ref_grads)):
        rel = ((got.double() - want).abs().max() / want.abs().max()).item()
        assert rel < 3e-2, f"{pattern_layout(xb, ub, grid, stride)}: bfloat16 relative error {rel:.2e}"
    with pytest.raises(ValueError, match="layout must be one of"):
        pattern_keys(x, u, grid, stride, layout="nhwc")
    if "spatial_c" not in layouts:
        with pytest.raises(ValueError, match="spatial_c"):
            pattern_keys(x, u, grid, stride, layout="spatial_c")
