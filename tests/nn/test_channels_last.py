"""Memory formats and compilation of the registered models: ``model.to(memory_format=...)``
(timm's ``train.py --channels-last``) and ``torch.compile`` without graph breaks."""
from __future__ import annotations

import pytest
import timm
import torch

import structvit.models  # noqa: F401  (registers the models)
from structvit.nn.attention import StructSA

NAMES = tuple(timm.list_models("structvit*"))
IMAGE = tuple(n for n in NAMES if "video" not in n)
VIDEO = tuple(n for n in NAMES if "video" in n)


def _input(model, side, frames=None, device="cpu"):
    c = model.pretrained_cfg["input_size"][0]
    shape = (2, c, frames, side, side) if frames else (2, c, side, side)
    return torch.randn(shape, device=device, generator=None if device == "meta" else torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", IMAGE)
def test_channels_last_every_image_model(name):
    """.to(memory_format=channels_last) works and keeps every state-dict shape (checkpoints
    load as before); the patterns keep their layout; the model runs on a channels-last input."""
    with torch.device("meta"):
        model = timm.create_model(name)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    model = model.to(memory_format=torch.channels_last)
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    patterns = [p for m in model.modules() if isinstance(m, StructSA) for p in (m.u_k, m.u_v)]
    assert patterns and all(p.is_contiguous() for p in patterns)
    size = model.pretrained_cfg["input_size"][1]
    x = _input(model, size, device="meta").to(memory_format=torch.channels_last)
    assert model.eval()(x).shape == (2, model.num_classes)


@pytest.mark.parametrize("name", VIDEO)
def test_channels_last_3d_every_video_model(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    model = model.to(memory_format=torch.channels_last_3d)
    x = _input(model, model.pretrained_cfg["input_size"][1], model.pretrained_cfg["num_frames"], device="meta")
    assert model.eval()(x.to(memory_format=torch.channels_last_3d)).shape == (2, model.num_classes)


@pytest.mark.parametrize("name, side", [("structvit_tiny", 64), ("structvit_deit_tiny", 32)])
def test_channels_last_same_values(name, side, one_thread):
    """A tiny model in channels-last memory computes what it computes in the default layout."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = _input(model, side)
    want = model(x)
    model = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), want, rtol=1e-4, atol=1e-4)


def test_structsa_training_step_has_no_graph_break(one_thread):
    """torch.compile (any mode, "reduce-overhead" included) captures a StructViT training forward,
    StructSA blocks and their backend dispatch included, as one graph."""
    torch.manual_seed(0)
    model = timm.create_model("structvit_tiny").train()
    x = _input(model, 64)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda inp: model(inp).logsumexp(-1).mean())(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_channels_last_cuda_training_step():
    """On the GPU: a bf16 training step of a channels-last model (Triton depthwise and pattern
    convolutions) gives the default layout's loss and gradients."""
    torch.manual_seed(0)
    model = timm.create_model("structvit_tiny").cuda().train()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    results = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        model = model.to(memory_format=fmt)
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x.to(memory_format=fmt)).float().logsumexp(-1).mean()
        loss.backward()
        results.append((loss.detach(), model.patch_embed1.proj.weight.grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=5e-2, atol=5e-2)
