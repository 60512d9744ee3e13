"""Attention modules: SelfAttention, StructSA, ConvSA."""
from __future__ import annotations

import pytest
import torch

from reference import reference_struct_attention
from structvit.nn import ConvSA, SelfAttention, StructSA


def _pair(grid, window=(3, 3), **kwargs):
    torch.manual_seed(0)
    sa = SelfAttention(32, 4).double()
    st = StructSA(32, 4, window=window, init="sa", **kwargs).double()
    missing, unexpected = st.load_state_dict(sa.state_dict(), strict=False)
    assert sorted(missing) == ["u_k", "u_v"] and not unexpected
    st.reset_patterns("sa")
    return sa, st


@pytest.mark.parametrize("grid,window", [((5, 6), (3, 3)), ((3, 4, 4), (3, 3, 3)), ((3, 4, 4), (3, 3)), ((5, 6), (3, 5, 5))])
@pytest.mark.parametrize("normalize", ["joint", "per_pattern"])
@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("backend", ["naive", "correlation", "keyconv"])
def test_sa_init_equals_self_attention(grid, window, normalize, share, backend):
    sa, st = _pair(grid, window, normalize=normalize, share_patterns=share, num_patterns=4, backend=backend)
    x = torch.randn(2, torch.Size(grid).numel(), 32, dtype=torch.float64)
    torch.testing.assert_close(st(x, grid), sa(x, grid), rtol=0, atol=1e-12)


def test_sa_init_patterns_get_different_gradients():
    grid = (4, 4)
    _, st = _pair(grid, num_patterns=4)
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    st(x, grid).pow(2).sum().backward()
    g = st.u_k.grad  # (heads, D, 3, 3)
    assert g.abs().max() > 0
    # the D patterns start identical (u_k) but do not receive identical gradients
    assert (g[:, 1:] - g[:, :1]).abs().max() > 1e-6 * g.abs().max()
    delta = torch.zeros(3, 3, dtype=torch.float64)
    delta[1, 1] = 1
    torch.testing.assert_close(st.u_v.detach().sum(1), 4 * delta.expand(4, 3, 3), rtol=0, atol=1e-12)  # sum_d e_d = 0


def test_module_matches_reference_with_its_own_weights():
    torch.manual_seed(1)
    m = StructSA(24, 3, window=(3, 3, 3), num_patterns=2, normalize="per_pattern").double()
    grid = (2, 3, 3)
    x = torch.randn(2, 18, 24, dtype=torch.float64)
    q, k, v = m.qkv(x).reshape(2, 18, 3, 3, 8).permute(2, 0, 3, 1, 4)
    ref, ref_w = reference_struct_attention(q, k, v, m.u_k, m.u_v, grid, "per_pattern")
    expected = m.proj(ref.transpose(1, 2).reshape(2, 18, 24))
    out, w = m(x, grid, return_weights=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(w, ref_w, rtol=0, atol=1e-12)


def test_2d_window_on_video_grid_acts_per_frame():
    torch.manual_seed(0)
    m2 = StructSA(16, 2, window=(3, 3), num_patterns=3).double()
    m3 = StructSA(16, 2, window=(1, 3, 3), num_patterns=3).double()
    sd = m2.state_dict()
    sd["u_k"], sd["u_v"] = sd["u_k"].unsqueeze(2), sd["u_v"].unsqueeze(2)
    m3.load_state_dict(sd)
    x = torch.randn(1, 2 * 3 * 3, 16, dtype=torch.float64)
    torch.testing.assert_close(m2(x, (2, 3, 3)), m3(x, (2, 3, 3)), rtol=0, atol=1e-12)


def test_3d_window_on_image_grid_uses_centre_frame():
    torch.manual_seed(0)
    m3 = StructSA(16, 2, window=(3, 3, 3), num_patterns=3).double()
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    torch.testing.assert_close(m3(x, (3, 4)), m3(x, (1, 3, 4)), rtol=0, atol=1e-12)


def test_convsa_is_one_pattern():
    m = ConvSA(16, 2, window=(3, 3))
    assert m.num_patterns == 1 and m.u_k.shape == (2, 1, 3, 3)
    assert m(torch.randn(2, 12, 16), (3, 4)).shape == (2, 12, 16)


def test_parameter_shapes_and_random_init():
    torch.manual_seed(0)
    m = StructSA(64, 4, window=(5, 5), num_patterns=8)
    assert m.u_k.shape == m.u_v.shape == (4, 8, 5, 5)
    assert StructSA(64, 4, window=(3, 3, 3), share_patterns=True).u_k.shape == (1, 8, 3, 3, 3)
    std = m.u_k.std().item()
    assert 0.6 * 25 ** -0.5 < std < 1.2 * 25 ** -0.5  # truncated normal with std M^-1/2
    names = {n for n, _ in m.named_parameters()}
    assert names == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "u_k", "u_v"}


def test_gradients_reach_every_parameter():
    m = StructSA(16, 2, window=(3, 3), num_patterns=4)
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


@pytest.mark.parametrize("kwargs,match", [
    (dict(window=(2, 3)), r"window must be 2 or 3 odd positive ints"),
    (dict(window=(3,)), r"window must be 2 or 3 odd positive ints"),
    (dict(num_patterns=0), r"num_patterns must be a positive int"),
    (dict(normalize="sum"), r"normalize must be one of"),
    (dict(init="zeros"), r"init must be one of"),
    (dict(backend="triton"), r"backend must be one of"),
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
    layer = StructSA(16, 2, window=(3, 3), num_patterns=2)
    assert layer.last_backend is None
    layer(torch.randn(1, 12, 16), (3, 4))
    assert layer.last_backend in ("naive", "correlation", "keyconv", "fused")
    layer.backend = "keyconv"
    layer(torch.randn(1, 12, 16), (3, 4))
    assert layer.last_backend == "keyconv"
    layer.backend = "auto"
    layer(torch.randn(1, 12, 16), (3, 4), return_weights=True)
    assert layer.last_backend == "correlation"  # weights asked for


def test_structsa_memory_limit_reaches_the_op(monkeypatch):
    """The layer's memory_limit goes to both the backend choice and the op, and a small
    limit changes nothing in the result."""
    from structvit.nn import attention

    torch.manual_seed(0)
    layer = StructSA(16, 2, window=(3, 3, 3), num_patterns=2).double()
    x = torch.randn(1, 2 * 3 * 4, 16, dtype=torch.float64)
    free = layer(x, (2, 3, 4))
    seen = []
    op = attention.struct_attention
    monkeypatch.setattr(attention, "struct_attention", lambda *a, **kw: seen.append(kw["memory_limit"]) or op(*a, **kw))
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
