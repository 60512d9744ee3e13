"""Attention modules: SelfAttention, StructSA, ConvSA."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from reference import reference_struct_attention
from structvit.nn import ConvSA, SelfAttention, StructSA

LAYOUTS = ["channel", "head", "shared"]


def _pair(window=(3, 3), **kwargs):
    torch.manual_seed(0)
    sa = SelfAttention(32, 4).double()
    st = StructSA(32, 4, window=window, init="sa", **kwargs).double()
    missing, unexpected = st.load_state_dict(sa.state_dict(), strict=False)
    assert sorted(missing) == ["u_k", "u_v"] and not unexpected
    st.reset_patterns("sa")  # in float64: the zero-sum perturbations are exact in the dtype used
    return sa, st


@pytest.mark.parametrize("grid,window", [((5, 6), (3, 3)), ((3, 4, 4), (3, 3, 3)), ((3, 4, 4), (3, 3)), ((5, 6), (3, 5, 5))])
@pytest.mark.parametrize("normalize", ["joint", "per_pattern"])
@pytest.mark.parametrize("patterns", LAYOUTS)
@pytest.mark.parametrize("backend", ["naive", "keyconv", "auto"])
def test_sa_init_equals_self_attention(grid, window, normalize, patterns, backend):
    sa, st = _pair(window, normalize=normalize, patterns=patterns, num_patterns=4, backend=backend)
    x = torch.randn(2, math.prod(grid), 32, dtype=torch.float64)
    torch.testing.assert_close(st(x, grid), sa(x, grid), rtol=0, atol=1e-12)


def test_sa_init_with_a_value_window_of_its_own():
    sa, st = _pair((3, 3), window_v=(5, 5))
    x = torch.randn(2, 30, 32, dtype=torch.float64)
    torch.testing.assert_close(st(x, (5, 6)), sa(x, (5, 6)), rtol=0, atol=1e-12)


def test_sa_init_is_exact_in_float32():
    torch.manual_seed(0)
    sa = SelfAttention(32, 4)
    st = StructSA(32, 4, window=(3, 3), init="sa")
    st.load_state_dict(sa.state_dict(), strict=False)
    x = torch.randn(2, 30, 32)
    torch.testing.assert_close(st(x, (5, 6)), sa(x, (5, 6)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("patterns", LAYOUTS)
def test_sa_init_patterns_get_different_gradients(patterns):
    grid = (4, 4)
    _, st = _pair(num_patterns=4, patterns=patterns)
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    st(x, grid).pow(2).sum().backward()
    g = st.u_k.grad.movedim(st.pattern_dim, 0)  # (D, ...)
    assert g.abs().max() > 0
    # the D patterns start identical (u_k) but do not receive identical gradients
    assert (g[1:] - g[:1]).abs().max() > 1e-6 * g.abs().max()
    delta = torch.zeros(3, 3, dtype=torch.float64)
    delta[1, 1] = 1
    sums = st.u_v.detach().sum(st.pattern_dim)  # sum_d e_d = 0: D centre deltas
    torch.testing.assert_close(sums, 4 * delta.expand_as(sums), rtol=0, atol=1e-12)


@pytest.mark.parametrize("patterns,kv_stride,window_v", [("channel", 1, None), ("head", 2, None),
                                                          ("shared", 1, (1, 3, 3)), ("channel", (1, 2, 2), (3, 1, 1))])
def test_module_matches_reference_with_its_own_weights(patterns, kv_stride, window_v):
    torch.manual_seed(1)
    m = StructSA(24, 3, window=(3, 3, 3), num_patterns=2, normalize="per_pattern", patterns=patterns,
                 kv_stride=kv_stride, window_v=window_v).double()
    grid = (2, 3, 3)
    x = torch.randn(2, 18, 24, dtype=torch.float64)
    q, k, v = m.qkv(x).reshape(2, 18, 3, 3, 8).permute(2, 0, 3, 1, 4)
    ref, ref_w = reference_struct_attention(q, k, v, m.u_k, m.u_v, grid, "per_pattern", kv_stride=kv_stride)
    expected = m.proj(ref.transpose(1, 2).reshape(2, 18, 24))
    out, w = m(x, grid, return_weights=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(w, ref_w, rtol=0, atol=1e-12)


def test_channelwise_convsa_module_is_attention_over_depthwise_projections():
    """ConvSA, channel-wise: SA whose keys and values pass a depthwise convolution (CvT/MViT)."""
    torch.manual_seed(0)
    m = ConvSA(16, 2, window=(3, 3), kv_stride=2).double()
    x = torch.randn(2, 20, 16, dtype=torch.float64)
    q, k, v = m._qkv(x)

    def depthwise(t, u):
        maps = t.transpose(-1, -2).reshape(2, 16, 4, 5)
        y = F.conv2d(maps, u.reshape(16, 1, 3, 3), stride=2, padding=1, groups=16)
        return y.reshape(2, 2, 8, -1).transpose(-1, -2)

    expected = m._out(F.scaled_dot_product_attention(q, depthwise(k, m.u_k), depthwise(v, m.u_v)))
    torch.testing.assert_close(m(x, (4, 5)), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("patterns", LAYOUTS)
def test_2d_window_on_video_grid_acts_per_frame(patterns):
    torch.manual_seed(0)
    m2 = StructSA(16, 2, window=(3, 3), num_patterns=3, patterns=patterns).double()
    m3 = StructSA(16, 2, window=(1, 3, 3), num_patterns=3, patterns=patterns).double()
    sd = m2.state_dict()
    sd["u_k"], sd["u_v"] = sd["u_k"].unsqueeze(-3), sd["u_v"].unsqueeze(-3)
    m3.load_state_dict(sd)
    x = torch.randn(1, 2 * 3 * 3, 16, dtype=torch.float64)
    torch.testing.assert_close(m2(x, (2, 3, 3)), m3(x, (2, 3, 3)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("patterns", LAYOUTS)
def test_3d_window_on_image_grid_uses_centre_frame(patterns):
    torch.manual_seed(0)
    m3 = StructSA(16, 2, window=(3, 3, 3), num_patterns=3, patterns=patterns, kv_stride=(1, 2, 1)).double()
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    torch.testing.assert_close(m3(x, (3, 4)), m3(x, (1, 3, 4)), rtol=0, atol=1e-12)


def test_convsa_is_one_pattern():
    m = ConvSA(16, 2, window=(3, 3))
    assert m.num_patterns == 1 and m.u_k.shape == (2, 8, 1, 3, 3)
    assert ConvSA(16, 2, patterns="head").u_k.shape == (2, 1, 3, 3)
    assert m(torch.randn(2, 12, 16), (3, 4)).shape == (2, 12, 16)


def test_parameter_shapes_and_random_init():
    torch.manual_seed(0)
    m = StructSA(64, 4, window=(5, 5), num_patterns=8)
    assert m.u_k.shape == m.u_v.shape == (4, 16, 8, 5, 5)  # channel-wise (heads, head_dim, D, *window)
    assert StructSA(64, 4, window=(3, 3, 3), patterns="head").u_k.shape == (4, 4, 3, 3, 3)
    assert StructSA(64, 4, window=(3, 3, 3), patterns="shared").u_k.shape == (4, 3, 3, 3)
    other = StructSA(64, 4, window=(3, 3), window_v=(5, 5))
    assert other.u_k.shape == (4, 16, 4, 3, 3) and other.u_v.shape == (4, 16, 4, 5, 5)
    std = m.u_k.std().item()
    assert 0.6 * 25 ** -0.5 < std < 1.2 * 25 ** -0.5  # truncated normal with std M^-1/2
    names = {n for n, _ in m.named_parameters()}
    assert names == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "u_k", "u_v"}


def test_gradients_reach_every_parameter():
    m = StructSA(16, 2, window=(3, 3), num_patterns=4, kv_stride=2)
    m(torch.randn(2, 9, 16), (3, 3)).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_attention_dropout_only_in_training():
    torch.manual_seed(0)
    m = StructSA(16, 2, window=(3, 3), num_patterns=2, attn_drop=0.5)
    x = torch.randn(2, 9, 16)
    m.eval()
    torch.testing.assert_close(m(x, (3, 3)), m(x, (3, 3)))
    m.train()
    assert not torch.allclose(m(x, (3, 3)), m(x, (3, 3)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("patterns", ["channel", "head"])
def test_autocast(dtype, patterns):
    """Mixed precision: q, k, v come out of the projection in the autocast dtype while the
    patterns are float32 parameters; the output has the autocast dtype, the gradients the
    parameters' dtype."""
    torch.manual_seed(0)
    m = StructSA(16, 2, window=(3, 3, 3), patterns=patterns)
    x = torch.randn(2, 18, 16)
    with torch.autocast("cpu", dtype=dtype):
        y = m(x, (2, 3, 3))
    assert y.dtype == dtype
    y.float().sum().backward()
    assert m.u_k.grad is not None and m.u_k.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), m(x, (2, 3, 3)), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("kwargs,match", [
    (dict(window=(2, 3)), r"window must be 2 or 3 odd positive ints"),
    (dict(window=(3,)), r"window must be 2 or 3 odd positive ints"),
    (dict(window_v=(3, 3, 3)), r"window_v must have the rank of window"),
    (dict(window_v=(4, 3)), r"window_v must be 2 or 3 odd positive ints"),
    (dict(kv_stride=0), r"kv_stride must be a positive int or 2 positive ints"),
    (dict(kv_stride=(1, 2, 2)), r"kv_stride must be a positive int or 2 positive ints"),
    (dict(num_patterns=0), r"num_patterns must be a positive int"),
    (dict(patterns="pixel"), r"patterns must be one of \('channel', 'head', 'shared'\)"),
    (dict(normalize="sum"), r"normalize must be one of"),
    (dict(init="zeros"), r"init must be one of"),
    (dict(backend="triton"), r"backend must be one of"),
    (dict(backend="correlation"), r"backend='correlation' cannot serve this layer: .*not channel-wise"),
    (dict(backend="fused", patterns="head", kv_stride=2), r"backend='fused' cannot serve this layer: .*kv_stride=1"),
    (dict(num_heads=5), r"num_heads must be a positive int dividing dim=32"),
    (dict(memory_limit=0), r"memory_limit must be a positive int \(bytes\) or None"),
    (dict(memory_limit=1.5), r"memory_limit must be a positive int \(bytes\) or None"),
])
def test_bad_module_arguments(kwargs, match):
    args = dict(dim=32, num_heads=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        StructSA(**args)


def test_bad_forward_arguments():
    m = StructSA(32, 4)
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, 32\)"):
        m(torch.randn(2, 12, 16), (3, 4))
    with pytest.raises(ValueError, match=r"grid=\(3, 5\) has 15 positions but the inputs have N=12"):
        m(torch.randn(2, 12, 32), (3, 5))
    with pytest.raises(ValueError, match=r"grid=\(3, 5\) has 15 positions"):
        SelfAttention(32, 4)(torch.randn(2, 12, 32), (3, 5))


def test_structsa_records_the_backend_it_ran():
    layer = StructSA(16, 2, window=(3, 3), num_patterns=2, patterns="head")
    assert layer.last_backend is None
    layer(torch.randn(1, 12, 16), (3, 4))
    assert layer.last_backend in ("correlation", "keyconv", "fused")
    layer.backend = "keyconv"
    layer(torch.randn(1, 12, 16), (3, 4))
    assert layer.last_backend == "keyconv"
    layer.backend = "auto"
    layer(torch.randn(1, 12, 16), (3, 4), return_weights=True)
    assert layer.last_backend == "correlation"  # weights asked for
    channelwise = StructSA(16, 2, window=(3, 3), num_patterns=2)
    channelwise(torch.randn(1, 12, 16), (3, 4))
    assert channelwise.last_backend == "keyconv"  # the paper's form serves channel-wise patterns


def test_structsa_memory_limit_reaches_the_op(monkeypatch):
    """The layer's memory_limit goes to the op (its backend choice and the fused kernel's
    plan), and a small limit changes nothing in the result."""
    from structvit.nn import attention

    torch.manual_seed(0)
    layer = StructSA(16, 2, window=(3, 3, 3), num_patterns=2, patterns="head").double()
    x = torch.randn(1, 2 * 3 * 4, 16, dtype=torch.float64)
    free = layer(x, (2, 3, 4))
    seen = []
    op = attention.struct_attention_unchecked
    monkeypatch.setattr(attention, "struct_attention_unchecked", lambda *a: seen.append(a[-1]) or op(*a))
    layer.memory_limit = 4096
    torch.testing.assert_close(layer(x, (2, 3, 4)), free, rtol=0, atol=1e-12)
    assert seen == [4096]
    assert "memory_limit=4096" in repr(layer)


def test_structvit_passes_memory_limit_to_its_structsa_layers():
    import timm

    import structvit.models  # noqa: F401  (registers the models)

    model = timm.create_model("structvit_tiny", struct_blocks=(1, 1), memory_limit=8 << 20)
    limits = [m.memory_limit for m in model.modules() if isinstance(m, StructSA)]
    assert limits == [8 << 20, 8 << 20]


@pytest.mark.parametrize("grid,window", [((5, 6), (1, 1)), ((3, 4, 4), (1, 1, 1)), ((3, 4, 4), (1, 1))])
@pytest.mark.parametrize("normalize", ["joint", "per_pattern"])
@pytest.mark.parametrize("patterns", LAYOUTS)
def test_random_init_of_a_one_tap_window_starts_as_sa(grid, window, normalize, patterns):
    # A 1x1 (1x1x1) pattern is only a per-channel gain. Zero-mean random gains gave the layer a
    # value gain mean_d u_v ~ 0.4 rms, and a 1x1 StructSA that did not train (docs/usage/studies.md,
    # Table 1b); the default init now starts it as SA.
    torch.manual_seed(0)
    sa = SelfAttention(32, 4).double()
    st = StructSA(32, 4, window=window, num_patterns=4, normalize=normalize, patterns=patterns).double()
    st.load_state_dict(sa.state_dict(), strict=False)
    st.reset_patterns()  # the default ("random"), drawn in float64
    x = torch.randn(2, math.prod(grid), 32, dtype=torch.float64)
    torch.testing.assert_close(st(x, grid), sa(x, grid), rtol=0, atol=1e-12)
    st(x, grid).pow(2).sum().backward()
    g = st.u_k.grad.movedim(st.pattern_dim, 0)  # the D patterns still get different gradients
    assert (g[1:] - g[:1]).abs().max() > 1e-6 * g.abs().max()


def test_random_one_tap_convsa_is_sa():
    torch.manual_seed(0)
    sa = SelfAttention(32, 4)
    st = ConvSA(32, 4, window=(1, 1))
    st.load_state_dict(sa.state_dict(), strict=False)
    x = torch.randn(2, 30, 32)
    torch.testing.assert_close(st(x, (5, 6)), sa(x, (5, 6)), rtol=1e-5, atol=1e-6)


def test_random_init_changes_only_one_tap_windows():
    torch.manual_seed(0)
    m = StructSA(64, 4, window=(3, 3), window_v=(1, 1), num_patterns=4)  # element-wise aggregation
    assert m.u_k.mean().abs() < 0.05 and 0.6 / 3 < m.u_k.std() < 1.2 / 3  # N(0, 1/M) as before
    torch.testing.assert_close(m.u_v.mean(dim=m.pattern_dim), torch.ones(4, 16, 1, 1))
    assert 0 < (m.u_v - 1).abs().max() < 0.1  # SA's gain plus the zero-sum e_d of init="sa"
