"""StructViT model family: registry, shapes, timm contract, block placement, argument checks."""
from __future__ import annotations

import pytest
import timm
import timm.optim
import torch
from safetensors.torch import load_file, save_file

from model_helpers import randomise_bn
import structvit  # noqa: F401  (registers the models)
from structvit.models import MODEL_NAMES, StructViT
from structvit.nn import SelfAttention, StructSA

VIDEO = {"structvit_tiny_video", "structvit_small_video", "structvit_base_video", "structvit_s_4_1", "structvit_b_4_1"}


def _input(name_or_model, b=2, size=32, frames=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    video = name_or_model in VIDEO if isinstance(name_or_model, str) else name_or_model.video
    shape = (b, 3, frames, size, size) if video else (b, 3, size, size)
    return torch.randn(shape, generator=g)


def test_registry_has_all_names():
    listed = set(timm.list_models("structvit_*"))
    assert set(MODEL_NAMES) == listed
    assert {"structvit_tiny", "structvit_small", "structvit_base", "structvit_tiny_video", "structvit_small_video",
            "structvit_base_video", "structvit_s_4_1", "structvit_b_4_1"} <= listed


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_forward_backward(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5)
    assert isinstance(model, StructViT)
    assert model.video == (name in VIDEO)
    cfg = model.pretrained_cfg
    assert cfg["input_size"][0] == 3 and len(cfg["mean"]) == 3 and len(cfg["std"]) == 3 and 0 < cfg["crop_pct"] <= 1
    if model.video:
        assert cfg["num_frames"] == 16 and model.num_frames == 16
    x = _input(name, b=2, size=32, frames=2)
    y = model(x)
    assert y.shape == (2, 5) and torch.isfinite(y).all()
    y.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"


def test_default_configs():
    cfg = timm.create_model("structvit_small").pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["num_classes"] == 1000 and cfg["crop_pct"] == 0.9
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN
    with torch.device("meta"):
        video = timm.create_model("structvit_b_4_1", num_frames=8)
    assert video.pretrained_cfg["num_classes"] == 400 and video.pretrained_cfg["num_frames"] == 8
    assert video.num_frames == 8 and video.struct_blocks == (4, 1)


@pytest.mark.parametrize("name,expected_m", [("structvit_small", 22), ("structvit_base", 50)])
def test_all_sa_param_counts_match_uniformer(name, expected_m):
    """UniFormer-S/B publish 22M/50M parameters (ImageNet head); all-SA StructViT is UniFormer."""
    with torch.device("meta"):
        model = timm.create_model(name, struct_blocks=(0, 0))
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e6) == expected_m, n
    assert not any(isinstance(m, StructSA) for m in model.modules())
    # StructSA adds only the patterns: heads * D * M * 2 per structural block
    with torch.device("meta"):
        struct = timm.create_model(name, struct_blocks="all")
    extra = sum(p.numel() for p in struct.parameters()) - n
    heads = [320 // 64, 512 // 64]
    expected = sum(model.depths[2 + s] * heads[s] * 8 * 9 * 2 for s in range(2))
    assert extra == expected


def test_video_param_counts_match_uniformer_video():
    """UniFormer-S/B for Kinetics-400 (16 frames): 21.4M / 49.8M parameters."""
    for name, expected in (("structvit_small_video", 21.4), ("structvit_base_video", 49.8)):
        with torch.device("meta"):
            model = timm.create_model(name, struct_blocks=(0, 0))
        assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == expected


def test_struct_blocks_placement():
    model = timm.create_model("structvit_tiny", struct_blocks=(1, 0))
    assert model.block_kinds == [["conv"], ["conv"], ["sa", "structsa"], ["sa"]]
    assert type(model.blocks3[0].attn) is SelfAttention
    assert isinstance(model.blocks3[1].attn, StructSA) and model.blocks3[1].attn.num_patterns == 8
    assert type(model.blocks4[0].attn) is SelfAttention

    allconv = timm.create_model("structvit_tiny", struct_blocks="all", attention="convsa", window=(5, 5))
    attns = [b.attn for b in list(allconv.blocks3) + list(allconv.blocks4)]
    assert all(isinstance(a, StructSA) and a.num_patterns == 1 and a.window == (5, 5) for a in attns)

    plain = timm.create_model("structvit_tiny", struct_blocks=(0, 0))
    assert not any(isinstance(m, StructSA) for m in plain.modules())

    with torch.device("meta"):
        b41 = timm.create_model("structvit_b_4_1")
    kinds3, kinds4 = b41.block_kinds[2], b41.block_kinds[3]
    assert kinds3 == ["sa"] * 16 + ["structsa"] * 4 and kinds4 == ["sa"] * 6 + ["structsa"]


def test_default_windows_and_patterns():
    image = timm.create_model("structvit_tiny")
    video = timm.create_model("structvit_tiny_video")
    assert image.blocks3[0].attn.u_k.shape == (4, 8, 3, 3)
    assert video.blocks3[0].attn.u_k.shape == (4, 8, 3, 3, 3)
    assert isinstance(video.head_drop, torch.nn.Dropout) and video.head_drop.p == 0.5
    assert image.head_drop.p == 0.0
    shared = timm.create_model("structvit_tiny", num_patterns=4, share_patterns=True, normalize="per_pattern")
    attn = shared.blocks4[0].attn
    assert attn.u_k.shape == (1, 4, 3, 3) and attn.normalize == "per_pattern"
    sa_init = timm.create_model("structvit_tiny", pattern_init="sa")
    uk = sa_init.blocks3[0].attn.u_k
    assert torch.equal(uk[:, :, 1, 1], torch.ones_like(uk[:, :, 1, 1])) and uk.abs().sum() == uk[:, :, 1, 1].sum()


def test_parameter_names_follow_uniformer():
    names = set(timm.create_model("structvit_tiny", struct_blocks=(1, 0)).state_dict())
    for key in ["patch_embed1.proj.weight", "patch_embed1.norm.weight", "patch_embed4.proj.bias",
                "blocks1.0.pos_embed.weight", "blocks1.0.norm1.running_mean", "blocks1.0.conv1.weight",
                "blocks1.0.attn.weight", "blocks1.0.conv2.weight", "blocks1.0.norm2.weight",
                "blocks1.0.mlp.fc1.weight", "blocks1.0.mlp.fc2.bias", "blocks3.0.pos_embed.weight",
                "blocks3.0.norm1.weight", "blocks3.0.attn.qkv.weight", "blocks3.0.attn.qkv.bias",
                "blocks3.0.attn.proj.weight", "blocks3.0.norm2.bias", "blocks3.0.mlp.fc1.weight",
                "blocks3.1.attn.u_k", "blocks3.1.attn.u_v", "norm.running_var", "head.weight"]:
        assert key in names, key
    image, video = timm.create_model("structvit_tiny"), timm.create_model("structvit_tiny_video")
    assert image.patch_embed1.proj.weight.dim() == 4 and video.patch_embed1.proj.weight.dim() == 5
    assert video.patch_embed1.proj.kernel_size == (3, 4, 4) and video.patch_embed1.proj.stride == (2, 4, 4)
    assert video.patch_embed2.proj.kernel_size == (1, 2, 2)
    assert video.blocks1[0].attn.kernel_size == (5, 5, 5) and video.blocks3[0].pos_embed.kernel_size == (3, 3, 3)
    assert isinstance(image.norm, torch.nn.BatchNorm2d) and isinstance(video.norm, torch.nn.BatchNorm3d)


def test_forward_head_and_classifier():
    model = timm.create_model("structvit_tiny").eval()
    x = _input(model, size=64)
    feats = model.forward_features(x)
    assert feats.shape == (2, 256, 2, 2)
    pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape == (2, 256)
    assert torch.allclose(model.forward_head(feats), model.head(pre))
    assert model.get_classifier() is model.head
    model.reset_classifier(7)
    assert model(x).shape == (2, 7) and model.num_classes == 7
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), torch.nn.Identity) and model(x).shape == (2, 256)
    model.reset_classifier(3, global_pool="")
    assert model(x).shape == (2, 3, 2, 2)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="max")


def test_no_weight_decay_names_positions_and_patterns():
    model = timm.create_model("structvit_tiny_video", struct_blocks=(1, 1))
    nwd = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert nwd <= set(params)
    assert "blocks1.0.pos_embed.weight" in nwd and "blocks3.0.pos_embed.weight" in nwd
    assert {"blocks3.1.attn.u_k", "blocks3.1.attn.u_v", "blocks4.0.attn.u_k", "blocks4.0.attn.u_v"} <= nwd
    assert "blocks3.1.attn.qkv.weight" not in nwd
    # timm's optimizer factory honours it
    groups = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05).param_groups
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(params["blocks3.1.attn.u_k"]) in no_decay and id(params["blocks1.0.pos_embed.weight"]) in no_decay
    assert id(params["blocks3.1.attn.qkv.weight"]) not in no_decay


@pytest.mark.parametrize("name,shape", [("structvit_tiny", (1, 3, 64, 64)), ("structvit_tiny_video", (1, 3, 4, 64, 64))])
def test_features_only(name, shape):
    feat = timm.create_model(name, features_only=True).eval()
    outs = feat(torch.randn(shape))
    assert feat.feature_info.channels() == [32, 64, 128, 256]
    assert feat.feature_info.reduction() == [4, 8, 16, 32]
    assert len(outs) == 4
    for out, c, r in zip(outs, feat.feature_info.channels(), feat.feature_info.reduction()):
        assert out.shape[:2] == (1, c) and tuple(out.shape[-2:]) == (64 // r, 64 // r)
        if len(shape) == 5:
            assert out.shape[2] == 2  # time halved once, at the stem
    sub = timm.create_model(name, features_only=True, out_indices=(1, 2)).eval()
    outs2 = sub(torch.randn(shape))
    assert [o.shape[1] for o in outs2] == [64, 128] and sub.feature_info.channels() == [64, 128]
    assert len(sub.model.blocks4) == 0  # stages after the last wanted one are pruned


def test_features_match_forward_intermediates():
    model = timm.create_model("structvit_tiny").eval()
    x = _input(model, size=64)
    final, inter = model.forward_intermediates(x)
    assert torch.allclose(final, model.forward_features(x), atol=1e-6)
    assert [t.shape[1] for t in inter] == [32, 64, 128, 256]
    early = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
    assert len(early) == 1 and torch.allclose(early[0], inter[0])


def test_variable_resolution_and_frames():
    image = timm.create_model("structvit_tiny").eval()
    for hw in [(64, 64), (96, 64), (128, 96)]:
        y = image(torch.randn(1, 3, *hw))
        assert y.shape == (1, 1000)
        assert image.forward_features(torch.randn(1, 3, *hw)).shape[-2:] == (hw[0] // 32, hw[1] // 32)
    video = timm.create_model("structvit_tiny_video").eval()
    for t in (1, 2, 4, 6):
        f = video.forward_features(torch.randn(1, 3, t, 64, 64))
        assert f.shape == (1, 256, (t + 1) // 2, 2, 2)


def test_grad_checkpointing_same_gradients(monkeypatch):
    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)

    def grads(ckpt: bool):
        torch.manual_seed(0)
        model = timm.create_model("structvit_tiny_video", drop_path_rate=0.2, num_frames=4)
        model.set_grad_checkpointing(ckpt)
        model.train()
        x = _input(model, size=32, frames=4)
        torch.manual_seed(1)  # the same drop-path masks in both runs
        loss = model(x).square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss0, g0 = grads(False)
    assert not calls
    loss1, g1 = grads(True)
    assert len(calls) == 5  # every block is checkpointed (depths 1, 1, 2, 1)
    assert torch.allclose(loss0, loss1)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-6, rtol=1e-5), n


def test_safetensors_round_trip(tmp_path):
    torch.manual_seed(0)
    model = randomise_bn(timm.create_model("structvit_tiny", struct_blocks=(1, 1))).eval()
    path = tmp_path / "m.safetensors"
    save_file(model.state_dict(), str(path))
    torch.manual_seed(1)
    other = timm.create_model("structvit_tiny", struct_blocks=(1, 1)).eval()
    x = _input(model, size=64)
    assert not torch.allclose(model(x), other(x))
    other.load_state_dict(load_file(str(path)))
    assert torch.equal(model(x), other(x))


def test_image_and_video_share_block_classes():
    image, video = timm.create_model("structvit_tiny"), timm.create_model("structvit_tiny_video")
    assert type(image.blocks1[0]) is type(video.blocks1[0])
    assert type(image.blocks3[0]) is type(video.blocks3[0])


@pytest.mark.parametrize("kwargs,match", [
    (dict(attention="local"), "attention"),
    (dict(struct_blocks=(3, 0)), "struct_blocks"),
    (dict(struct_blocks=(0, 2)), "struct_blocks"),
    (dict(struct_blocks="some"), "struct_blocks"),
    (dict(struct_blocks=(1,)), "struct_blocks"),
    (dict(struct_blocks=(-1, 0)), "struct_blocks"),
    (dict(window=(3, 3, 3)), "window"),
    (dict(window=(4, 4)), "window"),
    (dict(window=3), "window"),
    (dict(num_patterns=0), "num_patterns"),
    (dict(normalize="softmax"), "normalize"),
    (dict(pattern_init="zeros"), "init"),
    (dict(depths=(1, 1, 2)), "depths"),
    (dict(head_dim=48), "head_dim"),
    (dict(num_classes=-1), "num_classes"),
    (dict(num_frames=8), "num_frames"),
])
def test_bad_arguments_image(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model("structvit_tiny", **kwargs)


def test_bad_arguments_video_and_inputs():
    with pytest.raises(ValueError, match="window"):
        timm.create_model("structvit_tiny_video", window=(3, 3))
    with pytest.raises(ValueError, match="num_frames"):
        timm.create_model("structvit_tiny_video", num_frames=0)
    video = timm.create_model("structvit_tiny_video")
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        video(torch.randn(1, 3, 64, 64))
    image = timm.create_model("structvit_tiny")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        image(torch.randn(1, 3, 2, 64, 64))


def test_summary_counts_match_uniformer_and_cli(capsys):
    from structvit.models.summary import main, summarize

    rows = summarize(["structvit_small"], baselines=True)
    struct, sa = rows
    assert sa["struct_blocks"] == (0, 0) and struct["struct_blocks"] == (8, 3)
    # UniFormer-S: 22M parameters, 3.6 GFLOPs in fvcore's convention (= multiply-adds)
    assert round(sa["params"] / 1e6) == 22 and round(sa["flops"] / 2e9, 1) == 3.6
    assert sa["flops"] == sa["min_flops"]
    assert sa["flops"] < struct["min_flops"] <= struct["flops"]
    assert main(["structvit_tiny", "structvit_tiny_video"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| model |") and len(table) == 4
    assert "| structvit_tiny_video |" in table[3] and "3x16x112x112" in table[3]
    with pytest.raises(SystemExit):
        main(["resnet50"])
