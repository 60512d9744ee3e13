"""structvit report: FLOPs of SA/StructSA blocks against the analytic formulas, and the report itself."""
from __future__ import annotations

import json
import math

import pytest
import torch

import structvit.models  # noqa: F401
from structvit.nn import SelfAttention, StructSA
from structvit.report import attention_flops_analytic, flop_counter, main, report


def _count(module, x, grid):
    counter = flop_counter()
    with torch.no_grad(), counter:
        module(x, grid)
    return counter.get_total_flops()


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_sa_block_flops(device):
    b, dim, heads, grid = 2, 64, 4, (6, 7)
    n, c = 42, 16
    with torch.device(device):
        sa = SelfAttention(dim, heads)
        x = torch.zeros(b, n, dim)
    linear = 2 * b * n * (dim * 3 * dim + dim * dim)
    want = b * 4 * n * n * c * heads + linear  # 4 N^2 C per head: q k^T and A V, 2 FLOPs per multiply-add
    assert _count(sa, x, grid) == want  # on CPU this needs the fused-attention formula report.py adds
    assert attention_flops_analytic(sa, b, grid)["total"] == want


def _structsa_formula(backend, n, c, d, m, heads, b, n_kv=None):
    """Per head, multiply-adds (N' = n_kv keys); x2 for FLOPs."""
    n_kv = n if n_kv is None else n_kv
    if backend == "keyconv":  # depthwise pattern convolutions of K and V, then attention over D N' keys
        macs = 2 * n_kv * d * m * c + 2 * n * d * n_kv * c
    elif m <= c:  # correlation, value side folded into a transposed convolution
        macs = n * n * c + n * n * m * d + (n * n * m * d + n * n * c)
    else:  # correlation, shifted values
        macs = n * n * c + n * n * m * d + (n * m * d * c + d * n * n * c)
    return 2 * b * heads * macs


@pytest.mark.parametrize("backend,patterns,window,normalize,grid,head_dim", [
    ("correlation", "head", (3, 3), "joint", (7, 7), 16),          # folded value side (M <= C)
    ("correlation", "shared", (5, 5), "per_pattern", (6, 6), 16),  # shifted value side (M > C)
    ("keyconv", "channel", (3, 3), "joint", (7, 7), 16),
    ("keyconv", "channel", (3, 3), "per_pattern", (7, 7), 16),
    ("keyconv", "head", (3, 3), "joint", (7, 7), 16),
    ("keyconv", "channel", (3, 3, 3), "joint", (2, 4, 4), 32),
    ("correlation", "head", (3, 3, 3), "joint", (2, 4, 4), 32),
])
def test_structsa_block_flops_match_backend_formula(backend, patterns, window, normalize, grid, head_dim):
    b, heads, d = 2, 2, 4
    dim = heads * head_dim
    n, m = math.prod(grid), math.prod(window)
    layer = StructSA(dim, heads, window=window, num_patterns=d, patterns=patterns, normalize=normalize,
                     backend=backend)
    x = torch.randn(b, n, dim)
    linear = 2 * b * n * (dim * 3 * dim + dim * dim)
    want = _structsa_formula(backend, n, head_dim, d, m, heads, b) + linear
    assert _count(layer, x, grid) == want
    assert attention_flops_analytic(layer, b, grid) == dict(
        attention=want - linear, linear=linear, total=want, backend=backend)


@pytest.mark.parametrize("grid,window,stride,n_kv", [
    ((7, 7), (3, 3), 2, 16),                # ceil(7 / 2) ** 2 keys
    ((2, 6, 6), (3, 3, 3), (1, 2, 2), 18),  # video, spatial stride (the paper's StructViT-X-D-2)
])
def test_strided_channelwise_flops(grid, window, stride, n_kv):
    b, heads, c, d = 1, 2, 8, 4
    layer = StructSA(heads * c, heads, window=window, num_patterns=d, kv_stride=stride)
    n = math.prod(grid)
    linear = 2 * b * n * 4 * (heads * c) ** 2
    want = _structsa_formula("keyconv", n, c, d, math.prod(window), heads, b, n_kv=n_kv) + linear
    assert _count(layer, torch.randn(b, n, heads * c), grid) == want
    assert layer.last_backend == "keyconv"
    assert attention_flops_analytic(layer, b, grid)["total"] == want


def test_auto_backend_is_resolved_like_the_op():
    layer = StructSA(64, 2, window=(3, 3), num_patterns=8, patterns="head")
    for grid in ((3, 3), (14, 14)):
        n = grid[0] * grid[1]
        a = attention_flops_analytic(layer, 1, grid)
        assert _count(layer, torch.randn(1, n, 64), grid) == a["total"]
        assert a["backend"] == layer.last_backend  # what the op resolved in the counted forward
    assert attention_flops_analytic(StructSA(64, 2), 1, (14, 14))["backend"] == "keyconv"  # channel-wise


def test_report_per_block_type():
    r = report("structvit_tiny", input_size=(64,), measure=False, model_kwargs={"struct_blocks": (1, 1)})
    assert r["input"] == [1, 3, 64, 64]
    kinds = r["by_kind"]
    assert kinds["conv"]["count"] == 2 and kinds["sa"]["count"] == 1 and kinds["structsa"]["count"] == 2
    assert sum(e["flops"] for e in kinds.values()) == r["flops"]  # the parts cover the whole model
    assert sum(e["params"] for e in kinds.values()) == r["params"]
    assert r["flops_check"] and len(r["attention_layers"]) == 3
    assert all(a["counted"] == a["analytic"] for a in r["attention_layers"])
    assert kinds["structsa"]["attention_op_flops"] > 0


def test_report_measures_memory_and_throughput():
    r1 = report("structvit_tiny", input_size=(64,), batch=1, min_time=0.05)
    r2 = report("structvit_tiny", input_size=(64,), batch=2, min_time=0.05)
    assert r1["samples_per_s"] > 0 and r1["iters"] >= 3
    assert 1.6 < r2["activation_bytes_train"] / r1["activation_bytes_train"] < 2.4  # activations scale with batch


def test_report_cli(capsys):
    assert main(["structvit_tiny_video", "--input-size", "4,64,64", "--no-measure", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["input"] == [1, 3, 4, 64, 64] and r["flops_check"]
    assert {a["grid"][0] for a in r["attention_layers"]} == {2}  # time halved by the stem
    assert main(["structvit_tiny", "--input-size", "64", "--no-measure"]) == 0
    out = capsys.readouterr().out
    assert "| StructSA blocks | 3 |" in out and "| conv blocks | 2 |" in out and "NO" not in out
    assert main(["structvit_nope"]) == 2
    assert "MODEL: unknown model 'structvit_nope'" in capsys.readouterr().err
