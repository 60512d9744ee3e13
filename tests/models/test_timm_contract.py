"""timm's model contract on every registered structvit name, in our own words.

What timm's own ``tests/test_models.py`` checks of a model (forward, backward, the default
cfg's fields and feature shapes, classifier reset, ``features_only``,
``forward_intermediates``, TorchScript, torch.fx), here with video input for the video
models. Every name is built on the meta device (cfg fields, feature shapes, scripting and
fx tracing: no real compute); the tiny models also run on real tensors and are compared
with eager. torch.export is the serialisable route (a scripted model cannot be saved: the
StructSA op dispatches in Python).
"""
from __future__ import annotations

import math
import warnings

import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor

import structvit  # noqa: F401  (registers the models)
from structvit.models import StructDeiT
from structvit.nn import StructSA

NAMES = tuple(timm.list_models("structvit*"))
TINY = tuple(n for n in NAMES if "tiny" in n)
# real-tensor inputs per tiny model: (frames or None, side); small, but every stage sees a grid > 1
TINY_INPUT = {"structvit_tiny": (None, 64), "structvit_tiny_video": (4, 64),
              "structvit_deit_tiny": (None, 32), "structvit_deit_tiny_video": (4, 32)}


def _meta(name, **kwargs):
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def _default_input(model, batch=1, device="meta"):
    """The cfg's default input: (B, C, H, W), or (B, C, num_frames, H, W) for video."""
    c, h, w = model.pretrained_cfg["input_size"]
    frames = model.pretrained_cfg.get("num_frames")
    shape = (batch, c, frames, h, w) if frames else (batch, c, h, w)
    return torch.zeros(shape, device=device)


def _tiny_input(name, batch=1, seed=0):
    frames, side = TINY_INPUT[name]
    shape = (batch, 3, frames, side, side) if frames else (batch, 3, side, side)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _script(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates TorchScript; it still works
        return torch.jit.script(model)


def _fx(model):
    """timm's way: torchvision's feature extractor with timm's notrace leaves and functions."""
    kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                  param_shapes_constant=True)
    return create_feature_extractor(model, return_nodes=["head"], tracer_kwargs=kwargs)


def test_every_name_is_a_tiny_or_paper_model():
    assert set(TINY_INPUT) == set(TINY)
    assert {"structvit_s_4_1", "structvit_b_4_1_video", "structvit_deit_small"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_registered_cfg_fields(name):
    """The registry's cfg (no instance): num_frames for video, pool_size, first conv, classifier."""
    cfg = timm.models.get_pretrained_cfg(name)
    video = name.endswith("_video")
    frames = timm.get_pretrained_cfg_value(name, "num_frames")
    assert (frames is not None) == video and (frames is None or frames > 0)
    assert len(cfg.input_size) == 3 and cfg.num_classes > 0
    model = _meta(name)
    assert model.pretrained_cfg.get("num_frames") == frames
    assert getattr(model, "num_frames", None) == frames
    params = dict(model.named_parameters())
    assert cfg.first_conv + ".weight" in params and cfg.classifier + ".weight" in params
    if isinstance(model, StructDeiT):
        # token features (as timm's DeiT): no (H, W) pool, the position embedding fixes the size
        assert cfg.pool_size is None and cfg.fixed_input_size
        assert tuple(cfg.input_size[1:]) == model.img_size
    else:
        feats = model.eval().forward_features(_default_input(model))
        assert tuple(feats.shape[2:]) == tuple(cfg.pool_size), "pool_size must be the default input's last grid"


@pytest.mark.parametrize("name", NAMES)
def test_head_and_classifier_reset_on_meta(name):
    """forward_features / forward_head(pre_logits) widths, reset to 0 classes, no pooling."""
    model = _meta(name).eval()
    x = _default_input(model, batch=2)
    feats = model.forward_features(x)
    channel_dim = -1 if feats.dim() == 3 else 1  # DeiT: (B, N, dim) tokens
    assert feats.shape[channel_dim] == model.num_features
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.head_hidden_size)
    assert model(x).shape == (2, model.num_classes)
    model.reset_classifier(0)
    assert model.num_classes == 0 and model(x).shape == (2, model.num_features)
    model.reset_classifier(0, "")
    out = model(x)
    assert out.shape == feats.shape, "no pooling and no classifier: the unpooled features"
    unpooled = _meta(name, num_classes=0, global_pool="").eval()(x)
    assert unpooled.shape == feats.shape


@pytest.mark.parametrize("name", NAMES)
def test_scripts_and_traces_on_meta(name):
    """torch.jit.script compiles and torch.fx (timm's leaves) traces every model; both give eager's shapes."""
    model = _meta(name).eval()
    x = _default_input(model)
    want = (1, model.num_classes)
    scripted = _script(model)
    assert scripted(x).shape == want
    assert _fx(model)(x)["head"].shape == want


@pytest.mark.parametrize("name", NAMES)
def test_features_only_on_meta(name):
    """features_only (timm's getter wrapper) and forward_intermediates: one map per feature_info entry."""
    model = _meta(name).eval()
    x = _default_input(model)
    info = timm.models.FeatureInfo(model.feature_info, list(range(len(model.feature_info))))
    final, maps = model.forward_intermediates(x)
    assert len(maps) == len(info.channels())
    assert torch.equal(torch.tensor(final.shape), torch.tensor(model.forward_features(x).shape))
    grid = x.shape[2:]
    for m, c, r in zip(maps, info.channels(), info.reduction()):
        assert m.shape[:2] == (1, c)
        assert tuple(m.shape[-2:]) == tuple(math.ceil(s / r) for s in grid[-2:]) or tuple(
            m.shape[-2:]) == tuple(s // r for s in grid[-2:])
        assert m.dim() == x.dim(), "a video model's maps keep the time axis"
    features = _meta(name, features_only=True).eval()
    outs = features(x)
    assert [o.shape[1] for o in outs] == features.feature_info.channels()


@pytest.mark.parametrize("name", NAMES)
def test_feature_levels_and_cfg_names(name):
    """feature_info as timm's families give it: StructViT one level per stage (reductions 4-32),
    the DeiT-style models one per block as timm's ViTs, ``features_only`` taking the last 3 of
    them by default; the cfg's layer names, and the weight-decay exemptions."""
    model = _meta(name).eval()
    cfg = model.pretrained_cfg
    assert cfg["classifier"] == "head" and cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and 0 < cfg["crop_pct"] <= 1
    info = model.feature_info
    if isinstance(model, StructDeiT):
        assert cfg["first_conv"] == "patch_embed.proj"
        assert [f["module"] for f in info] == [f"blocks.{i}" for i in range(model.depth)]
        assert {f["num_chs"] for f in info} == {model.embed_dim} and {f["reduction"] for f in info} == {model.patch_size}
        want_levels = [f"blocks.{i}" for i in range(model.depth)][-3:]
    else:
        assert cfg["first_conv"] == "patch_embed1.proj"
        assert [f["num_chs"] for f in info] == list(model.embed_dims)
        assert [f["reduction"] for f in info] == [4, 8, 16, 32]
        assert [f["module"] for f in info] == ["blocks1", "blocks2", "blocks3", "blocks4"]
        want_levels = ["blocks1", "blocks2", "blocks3", "blocks4"]
    assert _meta(name, features_only=True).feature_info.module_name() == want_levels
    nwd = model.no_weight_decay()
    names = dict(model.named_parameters())
    assert nwd <= set(names)
    patterns = {n for n in names if n.endswith((".attn.u_k", ".attn.u_v"))}
    structsa = [m for m in model.modules() if isinstance(m, StructSA)]
    assert len(patterns) == 2 * len(structsa) > 0 and patterns <= nwd
    assert not any(n.endswith(".qkv.weight") for n in nwd)


@pytest.mark.parametrize("name", TINY)
def test_tiny_features_only_and_pruning(name, one_thread):
    """Real tensors: ``features_only`` maps equal ``forward_intermediates``; an ``out_indices``
    subset keeps those levels and prunes what follows the last one."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = _tiny_input(name)
    n_levels = len(model.feature_info)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert torch.allclose(final, model.forward_features(x), atol=1e-6) and len(maps) == n_levels
        early = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        assert len(early) == 1 and torch.allclose(early[0], maps[0], atol=1e-6)
        torch.manual_seed(0)  # the same weights
        feats = timm.create_model(name, features_only=True).eval()
        default = list(range(n_levels))[-3:] if isinstance(model, StructDeiT) else list(range(n_levels))
        for got, i in zip(feats(x), default, strict=True):
            assert torch.allclose(got, maps[i], atol=1e-6)
        sub = timm.create_model(name, features_only=True, out_indices=(1, 2)).eval()
        outs = sub(x)
    assert [o.shape for o in outs] == [maps[1].shape, maps[2].shape]
    if isinstance(model, StructDeiT):
        assert len(sub.model.blocks) == 3  # blocks after the last wanted one are pruned
    else:
        assert len(sub.model.blocks4) == 0  # stages after the last wanted one are pruned


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_backward_and_checkpointing(name, one_thread):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7).train()
    x = _tiny_input(name, batch=2)
    y = model(x)
    assert y.shape == (2, 7) and torch.isfinite(y).all()
    y.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:4]}"
    model.eval()
    with torch.no_grad():
        ref = model(x)
        model.set_grad_checkpointing(True)
        assert torch.allclose(model(x), ref, atol=1e-6)


@pytest.mark.parametrize("name", TINY)
def test_tiny_torchscript_equals_eager(name, one_thread):
    model = timm.create_model(name).eval()
    x = _tiny_input(name)
    scripted = _script(model)
    with torch.no_grad():
        assert torch.allclose(scripted(x), model(x), atol=1e-6)


@pytest.mark.parametrize("name", TINY)
def test_tiny_fx_equals_eager_and_backward(name, one_thread):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5).eval()
    x = _tiny_input(name, batch=2)
    with torch.no_grad():
        assert torch.equal(_fx(model)(x)["head"], model(x))
    traced = _fx(model.train())
    traced(x)["head"].mean().backward()
    missing = [n for n, p in traced.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient through the fx graph: {missing[:4]}"


@pytest.mark.parametrize("name", ["structvit_tiny", "structvit_tiny_video"])
def test_tiny_fx_features_only(name, one_thread):
    """timm's fx feature wrapper (``feature_cls="fx"``) gives the getter's maps."""
    torch.manual_seed(0)
    getter = timm.create_model(name, features_only=True).eval()
    torch.manual_seed(0)  # the same weights (the wrappers name their parameters differently)
    fx = timm.create_model(name, features_only=True, feature_cls="fx").eval()
    x = _tiny_input(name)
    with torch.no_grad():
        for a, b in zip(fx(x), getter(x), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", TINY)
def test_tiny_export_saves_and_equals_eager(name, tmp_path, one_thread):
    """torch.export: the serialisable graph (the alternative to a saved TorchScript model)."""
    model = timm.create_model(name).eval()
    x = _tiny_input(name)
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (x,)), path)
    loaded = torch.export.load(path).module()
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)


def test_scripted_model_cannot_be_saved(tmp_path, one_thread):
    """What docs/usage/models.md says: TorchScript calls the op's Python dispatch, so torch.jit.save refuses."""
    scripted = _script(timm.create_model("structvit_tiny").eval())
    with pytest.raises(Exception, match="Python"):
        torch.jit.save(scripted, tmp_path / "model.pt")


def test_struct_attention_layers_are_fx_leaves():
    from structvit.models.structvit_deit import DeiTBlock
    from structvit.nn import SelfAttention, StructSA

    assert {SelfAttention, StructSA, DeiTBlock} <= set(get_notrace_modules())
