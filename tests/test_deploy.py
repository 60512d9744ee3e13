"""Deployment: ONNX export (opset 17) run in onnxruntime, and torch.compile, of StructViT models with StructSA blocks."""
from __future__ import annotations

import io
import warnings

import pytest
import timm
import torch

import structvit  # noqa: F401

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

CASES = [("structvit_tiny", (1, 3, 64, 64)), ("structvit_tiny_video", (1, 3, 4, 64, 64))]


def _export(model, x) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape-derived Python ints
        # The TorchScript-based exporter (dynamo=False): the dynamo exporter needs onnxscript,
        # which is not a dependency. All sizes are fixed at export time: the StructSA grid is
        # read from the traced shapes, and with a dynamic batch axis the TorchScript exporter
        # loses the shapes of the op's grouped-convolution reshapes ("kernel of unknown shape").
        torch.onnx.export(model, (x,), buf, opset_version=17, dynamo=False, input_names=["x"], output_names=["logits"])
    return buf.getvalue()


@pytest.mark.parametrize("name,shape,patterns,kv_stride", [
    ("structvit_tiny", (1, 3, 64, 64), "channel", 1),        # the paper's StructSA
    ("structvit_tiny", (1, 3, 64, 64), "channel", 2),        # StructViT-X-D-2: strided keys and values
    ("structvit_tiny", (1, 3, 64, 64), "head", 1),           # dot-product variant (fused in eager, not in ONNX)
    ("structvit_tiny_video", (1, 3, 4, 64, 64), "channel", 1),
])
def test_onnx_export_matches_pytorch(name, shape, patterns, kv_stride):
    torch.manual_seed(0)
    model = timm.create_model(name, struct_blocks=(1, 1), patterns=patterns, kv_stride=kv_stride).eval()
    layers = [m for m in model.modules() if isinstance(m, structvit.nn.StructSA)]
    assert len(layers) == 2 and all(m.patterns == patterns and m.num_patterns == 4 for m in layers)
    data = _export(model, torch.randn(shape, generator=torch.Generator().manual_seed(1)))
    proto = onnx.load_from_string(data)
    onnx.checker.check_model(proto)
    assert proto.opset_import[0].version == 17
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = torch.randn(shape)  # other data than at export
    (got,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        expected = model(x)
    assert got.shape == tuple(expected.shape)
    assert torch.allclose(torch.from_numpy(got), expected, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("grid,window,kv_stride", [((6, 7), (3, 3), 1), ((2, 5, 6), (3, 3, 3), (1, 2, 2))])
def test_torch_compile_structsa_layer_matches_eager(grid, window, kv_stride):
    """A channel-wise StructSA layer through dynamo (backend "eager": graph capture only, no
    code generation), forward and input gradient against eager mode."""
    torch.manual_seed(0)
    layer = structvit.nn.StructSA(32, 2, window=window, kv_stride=kv_stride)
    assert layer.patterns == "channel"
    n = 1
    for g in grid:
        n *= g
    x = torch.randn(2, n, 32, requires_grad=True)
    compiled = torch.compile(layer, backend="eager", fullgraph=True, dynamic=False)
    y = compiled(x, grid)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    y_ref = layer(x, grid)
    (gx_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    assert torch.allclose(y, y_ref, atol=1e-5, rtol=1e-5) and torch.allclose(gx, gx_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.slow  # ~95 s on CPU (C++ code generation)
def test_torch_compile_inductor_matches_eager():
    torch.manual_seed(0)
    model = timm.create_model("structvit_tiny", depths=(1, 1, 1, 1), struct_blocks="all").eval()
    compiled = torch.compile(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name,shape", CASES)
def test_torch_compile_fullgraph_train_step(name, shape):
    """One graph (no breaks) through channel-wise StructSA, forward and backward (aot_eager:
    the compile front- and middle-end, without the slow C++ code generation of inductor)."""
    torch.manual_seed(0)
    model = timm.create_model(name, depths=(1, 1, 1, 1), struct_blocks="all")
    assert model.blocks3[0].attn.patterns == "channel"
    x = torch.randn((2,) + shape[1:])
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    torch.manual_seed(1)
    compiled(x).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    model(x).square().mean().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-5, rtol=1e-4), n
    assert grads["blocks3.0.attn.u_k"].abs().sum() > 0


@pytest.mark.slow
def test_torch_compile_inductor_train_step():
    torch.manual_seed(0)
    model = timm.create_model("structvit_tiny_video", struct_blocks="all")
    compiled = torch.compile(model)
    x = torch.randn(2, 3, 4, 64, 64)
    compiled(x).square().mean().backward()
    assert model.blocks3[0].attn.u_k.grad.abs().sum() > 0
