"""The DeiT ablation backbone (structvit_deit_*): timm contract, images and video, the
SA-equivalent start, the class-token reading, and DeiT-S's published size and cost."""
from __future__ import annotations

import math

import pytest
import timm
import timm.optim
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import structvit.ops  # noqa: F401  (FLOP formulas of the op's kernels)
from structvit.models.structvit_deit import StructDeiT
from structvit.nn import SelfAttention, StructSA

NAMES = ("structvit_deit_small", "structvit_deit_tiny", "structvit_deit_small_video", "structvit_deit_tiny_video")
IMAGE = (2, 3, 32, 32)
VIDEO = (2, 3, 8, 32, 32)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _tiny(video=False, **kwargs) -> StructDeiT:
    return timm.create_model("structvit_deit_tiny_video" if video else "structvit_deit_tiny", num_classes=10, **kwargs)


def _sa_equivalent(sa: StructDeiT, **kwargs) -> StructDeiT:
    """A StructSA twin of the SA model ``sa`` in float64: same weights, SA-equivalent patterns
    (reset after ``.double()``, so the zero-sum perturbations are exact in float64)."""
    model = _tiny(sa.video, **kwargs).double().eval()
    missing, unexpected = model.load_state_dict(sa.state_dict(), strict=False)
    assert not unexpected and missing and all(k.endswith((".u_k", ".u_v")) for k in missing)
    for m in model.modules():
        if isinstance(m, StructSA):
            m.reset_patterns("sa")
    return model


def test_registered_with_cfgs():
    for name in NAMES:
        assert name in timm.list_models("structvit_deit_*")
        cfg = timm.get_pretrained_cfg(name)
        assert cfg.first_conv == "patch_embed.proj" and cfg.classifier == "head"
    with torch.device("meta"):
        small = timm.create_model("structvit_deit_small")
        video = timm.create_model("structvit_deit_small_video")
    assert (small.depth, small.embed_dim, small.num_heads, small.patch_size, small.img_size) == (12, 384, 6, 16, (224, 224))
    attn = small.blocks[0].attn
    assert isinstance(attn, StructSA) and attn.num_patterns == 4 and attn.window == (3, 3) and attn.patterns == "channel"
    assert all(isinstance(b.attn, StructSA) for b in small.blocks)  # every SA layer replaced
    assert video.num_frames == 16 and video.pretrained_cfg["num_frames"] == 16 and video.blocks[0].attn.window == (3, 3, 3)
    assert video.patch_embed.proj.kernel_size == (2, 16, 16)
    assert not small.has_class_token and small.global_pool == "avg" and small.cls_token is None
    assert timm.get_pretrained_cfg_value("structvit_deit_tiny_video", "num_frames") == 8
    assert _tiny(True, num_frames=12).pretrained_cfg["num_frames"] == 12
    assert _tiny(img_size=64).pretrained_cfg["input_size"] == (3, 64, 64)
    with pytest.raises(ValueError, match="num_frames is for the video models"):
        timm.create_model("structvit_deit_tiny", num_frames=8)


@pytest.mark.parametrize("video", [False, True])
@pytest.mark.parametrize("attention", ["sa", "convsa", "structsa"])
def test_forward_backward(video, attention):
    torch.manual_seed(0)
    model = _tiny(video, attention=attention, drop_path_rate=0.1)
    x = torch.randn(VIDEO if video else IMAGE)
    out = model(x)
    assert out.shape == (2, 10)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    kinds = {type(b.attn) for b in model.blocks}
    assert kinds == ({SelfAttention} if attention == "sa" else {StructSA})
    if attention != "sa":
        attn = model.blocks[0].attn
        assert attn.num_patterns == (1 if attention == "convsa" else 4)
        assert attn.u_k.grad.abs().sum() > 0 and attn.u_v.grad.abs().sum() > 0
    if video:  # tokens on a (T/2, H/4, W/4) grid: the 3x3x3 window spans tubelets
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 4 * 8 * 8, model.embed_dim)


def test_structsa_kwargs_pass_through():
    model = _tiny(num_patterns=2, patterns="head", window=(5, 5), window_v=(1, 1), kv_stride=2,
                  normalize="per_pattern", backend="naive")
    attn = model.blocks[-1].attn
    assert (attn.num_patterns, attn.patterns, attn.window, attn.window_v, attn.kv_stride, attn.normalize,
            attn.backend) == (2, "head", (5, 5), (1, 1), (2, 2), "per_pattern", "naive")
    model(torch.randn(IMAGE))
    assert attn.last_backend == "naive"
    sa_start = _tiny(pattern_init="sa").blocks[0].attn
    centre = sa_start.u_k[..., 1, 1]
    assert torch.equal(centre, torch.ones_like(centre)) and sa_start.u_k.sum() == centre.numel()
    video = _tiny(True, window=(3, 3))  # a 2-D window on video acts within each frame
    assert video.blocks[0].attn.window == (3, 3)
    video(torch.randn(VIDEO))


def test_timm_contract():
    torch.manual_seed(0)
    model = _tiny(class_token=True)
    x = torch.randn(IMAGE)
    nwd = model.no_weight_decay()
    assert {"pos_embed", "cls_token", "blocks.0.attn.u_k", "blocks.3.attn.u_v"} <= nwd
    assert all(n in dict(model.named_parameters()) for n in nwd)
    groups = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75).param_groups
    assert len(groups) > 2  # one pair per layer group (group_matcher), decay and no decay
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.pos_embed) in no_decay and id(model.blocks[0].attn.u_k) in no_decay
    assert id(model.blocks[0].attn.qkv.weight) not in no_decay
    matcher = model.group_matcher()
    assert set(matcher) == {"stem", "blocks"}

    feats = model.forward_features(x)
    assert feats.shape == (2, 1 + 64, 96)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 96)
    assert torch.allclose(model.forward_head(feats), model(x))
    model.reset_classifier(5, "avg")
    assert model(x).shape == (2, 5) and model.global_pool == "avg"
    model.reset_classifier(0, "")
    assert model(x).shape == (2, 65, 96) and model.get_classifier().__class__.__name__ == "Identity"
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, "max")
    with pytest.raises(ValueError, match="class_token=True"):
        _tiny(global_pool="token")


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = _tiny(class_token=True)
    x = torch.randn(IMAGE)
    model(x).sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(plain, model.parameters()))


@pytest.mark.parametrize("video", [False, True])
def test_forward_intermediates_and_features_only(video):
    torch.manual_seed(0)
    model = _tiny(video, class_token=True).eval()
    x = torch.randn(VIDEO if video else IMAGE)
    grid = (4, 8, 8) if video else (8, 8)
    final, inter = model.forward_intermediates(x, indices=[1, 3])
    assert [tuple(t.shape) for t in inter] == [(2, 96) + grid] * 2
    assert torch.allclose(final, model.forward_features(x), atol=1e-6)
    nlc = model.forward_intermediates(x, indices=1, output_fmt="NLC", norm=True, intermediates_only=True,
                                      return_prefix_tokens=True)
    tokens, prefix = nlc[0]
    assert tokens.shape == (2, math.prod(grid), 96) and prefix.shape == (2, 1, 96)
    assert torch.allclose(torch.cat([prefix, tokens], 1), final, atol=1e-6)  # the last block, normalised
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")
    feats = timm.create_model("structvit_deit_tiny_video" if video else "structvit_deit_tiny", features_only=True,
                              out_indices=(1, 3))
    assert [tuple(f.shape) for f in feats(x)] == [(2, 96) + grid] * 2
    pruned = _tiny(video)
    assert pruned.prune_intermediate_layers([1]) == [1] and len(pruned.blocks) == 2


def test_input_checks():
    model = _tiny()
    with pytest.raises(ValueError, match=r"img_size=\(32, 32\)"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(1, 3, 2, 32, 32))
    with pytest.raises(ValueError, match="window must have 2 sizes"):
        _tiny(window=(3, 3, 3))
    with pytest.raises(ValueError, match="attention must be one of"):
        _tiny(attention="local")
    with pytest.raises(ValueError, match="divisible by tubelet_size"):
        _tiny(True, num_frames=7)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        _tiny(img_size=30)
    video = _tiny(True)
    assert video(torch.randn(1, 3, 12, 32, 32)).shape == (1, 10)  # another clip length: time_embed interpolated


@pytest.mark.parametrize("video,kwargs", [
    (False, {}),
    (False, dict(patterns="head", normalize="per_pattern")),
    (True, {}),
    (True, dict(attention="convsa", window=(3, 5, 5))),
])
def test_sa_equivalent_init_reproduces_the_sa_model(video, kwargs):
    """float64: StructSA with the SA-equivalent patterns computes what DeiT-SA computes."""
    torch.manual_seed(0)
    sa = _tiny(video, attention="sa").double().eval()
    torch.manual_seed(1)
    model = _tiny(video, **kwargs).double().eval()
    x = torch.randn(VIDEO if video else IMAGE, dtype=torch.float64)
    with torch.no_grad():
        expected = sa(x)
        model.load_state_dict(sa.state_dict(), strict=False)
        assert (model(x) - expected).abs().max() > 1e-3  # random patterns: a different function
        model = _sa_equivalent(sa, **kwargs)
        got = model(x)
    assert (got - expected).abs().max() < 1e-10
    attn = model.blocks[0].attn
    if attn.num_patterns > 1:  # SA-equivalent, but not D copies of one pattern
        assert not torch.equal(attn.u_v.select(attn.pattern_dim, 0), attn.u_v.select(attn.pattern_dim, 1))


def _reference_class_token(model: StructDeiT, x: torch.Tensor) -> torch.Tensor:
    """The class-token reading written out with SA weights: the class token attends to all
    tokens, the patch tokens to the patch tokens only (a mask), for an SA-equivalent model."""
    t, _ = model._embed(x)
    n = t.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool)
    allowed[1:, 0] = False
    for blk in model.blocks:
        a = blk.attn
        q, k, v = a._qkv(blk.norm1(t))
        t = t + a._out(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed))
        t = t + blk.mlp(blk.norm2(t))
    return model.forward_head(model.norm(t))


@pytest.mark.parametrize("video", [False, True])
def test_class_token_attends_with_plain_sa_weights(video):
    torch.manual_seed(0)
    sa = _tiny(video, attention="sa", class_token=True).double().eval()
    model = _sa_equivalent(sa, class_token=True)
    x = torch.randn(VIDEO if video else IMAGE, dtype=torch.float64)
    with torch.no_grad():
        got = model(x)
        assert (got - _reference_class_token(model, x)).abs().max() < 1e-10
        # SA: the patch tokens see the class token; StructSA: they do not
        assert (got - sa(x)).abs().max() > 1e-6
        feats, sa_feats = model.forward_features(x), sa.forward_features(x)
        shift = torch.randn_like(model.cls_token)  # not a constant: LayerNorm would remove that
        for m in (model, sa):
            m.cls_token.add_(shift)
        assert torch.equal(model.forward_features(x)[:, 1:], feats[:, 1:])
        assert not torch.allclose(sa.forward_features(x)[:, 1:], sa_feats[:, 1:])
        assert not torch.allclose(model.forward_features(x)[:, 0], feats[:, 0])
    # trained patterns: the class token still learns, the patterns too
    model = _tiny(video, class_token=True)
    model(torch.randn(VIDEO if video else IMAGE)).sum().backward()
    assert model.cls_token.grad.abs().sum() > 0 and model.blocks[0].attn.u_k.grad.abs().sum() > 0


def _count(name: str, **kwargs) -> tuple[int, float]:
    with torch.device("meta"):
        model = timm.create_model(name, **kwargs).eval()
        x = torch.zeros(1, 3, 224, 224)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() / 2  # multiply-adds


@pytest.mark.parametrize("attention,params_m,gmacs", [("structsa", 22.4, 5.7), ("convsa", 22.1, 4.6)])
def test_deit_small_matches_the_published_size(attention, params_m, gmacs):
    """Sec. 4.2: DeiT-S + StructSA 22.4M / 5.7 GFLOPs, + ConvSA 22.1M / 4.6 G (multiply-adds)."""
    params, macs = _count("structvit_deit_small", attention=attention)
    assert abs(params / 1e6 - params_m) / params_m < 0.06, params
    assert abs(macs / 1e9 - gmacs) / gmacs < 0.10, macs
    sa_params, sa_macs = _count("structvit_deit_small", attention="sa")
    assert sa_params < params and sa_macs < macs  # StructSA adds patterns and attention work


@pytest.mark.parametrize("video", [False, True])
def test_class_token_model_scripts_and_equals_eager(video, one_thread):
    """The class-token path runs ``StructSA.forward_with_prefix``, exported, so a scripted
    model takes it too, with eager's output."""
    import warnings

    torch.manual_seed(0)
    model = _tiny(video, class_token=True).eval()
    x = torch.randn(1, 3, 4, 32, 32) if video else torch.randn(1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates TorchScript; it still works
        scripted = torch.jit.script(model)
    with torch.no_grad():
        assert torch.allclose(scripted(x), model(x), atol=1e-6)
    assert isinstance(model.blocks[0].attn, StructSA) and hasattr(scripted.blocks[0].attn, "forward_with_prefix")
