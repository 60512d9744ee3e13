"""Which backend runs: auto's rules, resolve_backend, the fused kernel's memory plan."""
from __future__ import annotations

import pytest
import torch

from reference import random_inputs
from structvit.ops import choose_backend, estimate_cost, native, resolve_backend, struct_attention
from structvit.ops.backends.fused import FUSED_CHUNK_ELEMENTS, fused_plan
from structvit.ops.dispatch import DEFAULT_MEMORY_LIMIT, fused_can_serve

HAS_NATIVE = native.available()


def test_auto_choice_rules():
    # weights requested -> a backend that can return them
    assert choose_backend(1, 1, 16, 8, 2, 9, return_weights=True) == "correlation"
    # correlation memory over the limit -> keyconv
    assert choose_backend(2, 5, 1568, 64, 8, 27, memory_limit=1 << 28) == "keyconv"
    # nothing fits and no fused kernel -> the backend with the least memory
    assert choose_backend(2, 5, 1568, 64, 8, 27, memory_limit=1 << 20) == "keyconv"
    assert choose_backend(1, 1, 4, 512, 8, 1, memory_limit=1) == "correlation"
    # tiny maps with a large head dim: the correlation form is far cheaper than D attentions
    assert choose_backend(1, 1, 4, 512, 8, 1) == "correlation"
    cost = estimate_cost(16, 5, 196, 64, 8, 9)
    # keyconv costs ~2 D N^2 C, the folded correlation form N^2 (2C + 2MD)
    assert cost["keyconv"]["macs"] == 16 * 5 * (8 * 196 ** 2 * 128 + 196 * 9 * 8 * 128)
    assert cost["correlation"]["macs"] == 16 * 5 * 196 ** 2 * (64 + 72 + 72 + 64)


def test_auto_picks_keyconv_for_the_general_cases():
    """Channel-wise patterns, a stride or unequal windows: only keyconv (of the fast backends) serves them,
    also when the weights are asked for and whatever the fused kernel could do."""
    for kwargs in (dict(channelwise=True), dict(strided=True), dict(same_window=False)):
        assert choose_backend(16, 5, 196, 64, 4, 9, fused_ok=True, **kwargs) == "keyconv"
        assert choose_backend(16, 5, 196, 64, 4, 9, return_weights=True, **kwargs) == "keyconv"
    # stride 2: a quarter of the keys, a quarter of the attention's multiply-adds
    full = estimate_cost(1, 1, 196, 64, 4, 9)["keyconv"]["macs"]
    strided = estimate_cost(1, 1, 196, 64, 4, 9, n_kv=49)["keyconv"]["macs"]
    assert strided == 4 * 196 * 49 * 128 + 49 * 4 * 9 * 128 and strided < full / 3.9


def test_resolve_backend_is_what_runs():
    q, k, v, u_k, u_v = random_inputs(2, 3, (3, 4, 5), 4, 2, (3, 3, 3))
    assert resolve_backend(q, u_k, (3, 4, 5), backend="keyconv") == "keyconv"
    auto = resolve_backend(q, u_k, (3, 4, 5))
    assert auto in ("correlation", "keyconv", "fused")
    torch.testing.assert_close(struct_attention(q, k, v, u_k, u_v, (3, 4, 5)),
                               struct_attention(q, k, v, u_k, u_v, (3, 4, 5), backend=auto), rtol=0, atol=0)
    assert resolve_backend(q, u_k, (3, 4, 5), return_weights=True) == "correlation"
    assert resolve_backend(q, u_k[0], (3, 4, 5)) == auto  # shared patterns: the same choice
    channelwise = torch.randn(3, 4, 2, 3, 3, 3, dtype=torch.float64)
    assert resolve_backend(q, channelwise, (3, 4, 5)) == "keyconv"
    assert resolve_backend(q, u_k, (3, 4, 5), kv_stride=(1, 2, 2)) == "keyconv"
    assert resolve_backend(q, u_k, (3, 4, 5), u_v=torch.randn(3, 2, 1, 3, 3, dtype=torch.float64)) == "keyconv"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend(q, u_k, (3, 4, 5), backend="fast")
    with pytest.raises(ValueError, match="grid"):
        resolve_backend(q, u_k, (3, 4, 4))
    with pytest.raises(ValueError, match="backend='correlation' cannot serve"):
        resolve_backend(q, channelwise, (3, 4, 5), backend="correlation")


def test_auto_fused_rule():
    # the fused CPU kernel's cost model (AVX-512 and AVX2 builds): 3x3, 3x3x3 and 1x5x5
    # windows, keyconv (SDPA) for 5x5x5; the portable build only for 3x3
    for isa in ("avx512", "avx2"):
        assert choose_backend(16, 5, 196, 64, 8, 9, fused_ok=True, isa=isa) == "fused"
        assert choose_backend(2, 5, 1568, 64, 8, 27, fused_ok=True, isa=isa) == "fused"
        assert choose_backend(2, 5, 1568, 64, 8, 25, fused_ok=True, isa=isa) == "fused"
        assert choose_backend(2, 5, 1568, 64, 8, 125, fused_ok=True, isa=isa) == "keyconv"
    assert choose_backend(16, 5, 196, 64, 8, 9, fused_ok=True, isa="generic") == "fused"
    assert choose_backend(2, 5, 1568, 64, 8, 27, fused_ok=True, isa="generic") == "keyconv"
    assert choose_backend(16, 5, 196, 64, 8, 9, fused_ok=False) != "fused"
    assert choose_backend(16, 5, 196, 64, 8, 9, fused_ok=True, return_weights=True) == "correlation"
    # memory is the limit: the fused kernel (chunks shrink to fit) instead of keyconv's D-times keys
    assert choose_backend(2, 5, 1568, 64, 8, 125, fused_ok=True, memory_limit=8 << 20) == "fused"
    assert estimate_cost(2, 5, 1568, 64, 8, 27)["keyconv"]["bytes"] > 8 << 20


@pytest.mark.skipif(not HAS_NATIVE, reason="no C++ compiler for the fused CPU kernel")
def test_fused_served_under_tracing_modes_but_not_onnx_or_dropout():
    """The kernel is a custom op: a FLOP counter (a dispatch mode) and fake tensors see it, so
    "auto" keeps it there; dropout and ONNX export (no such ONNX operator) do not get it."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    q = torch.randn(1, 1, 4, 4)
    assert fused_can_serve(q, 0.0)
    assert not fused_can_serve(q, 0.1)
    with FlopCounterMode(display=False):
        assert fused_can_serve(q, 0.0)
    with FakeTensorMode() as mode:
        assert fused_can_serve(mode.from_tensor(q), 0.0)
    original = torch.onnx.is_in_onnx_export
    try:
        torch.onnx.is_in_onnx_export = lambda: True
        assert not fused_can_serve(q, 0.0)
    finally:
        torch.onnx.is_in_onnx_export = original


def test_auto_with_return_weights_matches_correlation():
    q, k, v, u_k, u_v = random_inputs(1, 2, (3, 4), 4, 2, (3, 3))
    _, w_auto = struct_attention(q, k, v, u_k, u_v, (3, 4), return_weights=True)
    _, w_corr = struct_attention(q, k, v, u_k, u_v, (3, 4), backend="correlation", return_weights=True)
    torch.testing.assert_close(w_auto, w_corr, rtol=0, atol=0)


def test_fused_plan_rule():
    n = 1568
    at = 10 * n * n * 4  # video benchmark: B*heads = 10, 98 MiB a map
    # default: At and S0 kept when they fit in DEFAULT_MEMORY_LIMIT with the chunks, else At only, else none
    assert fused_plan(10, n, 4, None) == (FUSED_CHUNK_ELEMENTS, 2)
    assert fused_plan(60, n, 4, None) == (FUSED_CHUNK_ELEMENTS, 1)  # 2 x 563 MiB do not fit, one does
    assert fused_plan(200, n, 4, None) == (FUSED_CHUNK_ELEMENTS, 0)  # 1.9 GiB: recomputed
    assert 200 * n * n * 4 > DEFAULT_MEMORY_LIMIT
    # an explicit limit: maps kept only in half of it, the chunks get the rest
    assert fused_plan(10, n, 4, 8 << 20) == ((8 << 20) // 16, 0)
    assert fused_plan(10, n, 4, 4 * at) == (2 * at // 16, 2)
    assert fused_plan(10, n, 4, 4 * at - 1) == ((3 * at - 1) // 16, 1)
    assert fused_plan(10, n, 4, 2 * at) == (at // 16, 1)
    assert fused_plan(10, n, 4, 2 * at - 1)[1] == 0


def test_memory_limit_argument():
    q, k, v, u_k, u_v = random_inputs(1, 1, (3, 3), 4, 2, (3, 3))
    for bad in (0, -5, 1.5, True, "1GB"):
        with pytest.raises(ValueError, match="memory_limit must be a positive int"):
            struct_attention(q, k, v, u_k, u_v, (3, 3), memory_limit=bad)
