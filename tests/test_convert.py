"""UniFormer -> StructViT conversion, image -> video inflation and the `structvit convert` command.

``uniformer_reference`` is an independent, functional forward pass of the official
UniFormer image/video models written from their published structure (Sense-X/UniFormer)
and driven only by state-dict names; it checks that UniFormer checkpoints mean the same
thing in StructViT, and that every tensor of such a checkpoint is used.
"""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from model_helpers import randomise_bn
import structvit  # noqa: F401
from structvit.convert import ConversionReport, inflate_weight, load_deit, load_uniformer, main, unwrap_state_dict
from structvit.nn import StructSA


class _Tracked(dict):
    """A state dict that remembers which names were read."""

    def __init__(self, *args):
        super().__init__(*args)
        self.used = set()

    def __getitem__(self, key):
        self.used.add(key)
        return super().__getitem__(key)


def uniformer_reference(sd: dict, x: torch.Tensor, depths, head_dim: int) -> torch.Tensor:
    """UniFormer's forward (eval mode), functional, from a state dict with UniFormer's names."""
    video = x.dim() == 5
    conv = F.conv3d if video else F.conv2d

    def bn(x, p):
        return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],
                            False, 0.0, 1e-5)

    def dwconv(x, p, pad):
        return conv(x, sd[p + ".weight"], sd[p + ".bias"], padding=pad, groups=x.shape[1])

    def pwconv(x, p):
        return conv(x, sd[p + ".weight"], sd[p + ".bias"])

    for s in range(4):
        p = f"patch_embed{s + 1}"
        w = sd[p + ".proj.weight"]
        if video and s == 0:  # 3x4x4 stem, stride (2, 4, 4), temporal padding 1
            x = conv(x, w, sd[p + ".proj.bias"], stride=(2, 4, 4), padding=(1, 0, 0))
        else:
            x = conv(x, w, sd[p + ".proj.bias"], stride=tuple(w.shape[2:]))
        c = x.shape[1]
        x = F.layer_norm(x.movedim(1, -1), (c,), sd[p + ".norm.weight"], sd[p + ".norm.bias"], 1e-5).movedim(-1, 1)
        for i in range(depths[s]):
            b = f"blocks{s + 1}.{i}"
            x = x + dwconv(x, b + ".pos_embed", 1)
            if s < 2:  # CBlock
                x = x + pwconv(dwconv(pwconv(bn(x, b + ".norm1"), b + ".conv1"), b + ".attn", 2), b + ".conv2")
                x = x + pwconv(F.gelu(pwconv(bn(x, b + ".norm2"), b + ".mlp.fc1")), b + ".mlp.fc2")
            else:  # SABlock
                shape = x.shape
                t = x.flatten(2).transpose(1, 2)
                bsz, n, _ = t.shape
                heads = c // head_dim
                h = F.layer_norm(t, (c,), sd[b + ".norm1.weight"], sd[b + ".norm1.bias"], 1e-6)
                qkv = F.linear(h, sd[b + ".attn.qkv.weight"], sd[b + ".attn.qkv.bias"])
                q, k, v = qkv.reshape(bsz, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
                attn = ((q @ k.transpose(-2, -1)) * head_dim ** -0.5).softmax(-1)
                o = (attn @ v).transpose(1, 2).reshape(bsz, n, c)
                t = t + F.linear(o, sd[b + ".attn.proj.weight"], sd[b + ".attn.proj.bias"])
                h = F.layer_norm(t, (c,), sd[b + ".norm2.weight"], sd[b + ".norm2.bias"], 1e-6)
                h = F.linear(F.gelu(F.linear(h, sd[b + ".mlp.fc1.weight"], sd[b + ".mlp.fc1.bias"])),
                             sd[b + ".mlp.fc2.weight"], sd[b + ".mlp.fc2.bias"])
                x = (t + h).transpose(1, 2).reshape(shape)
    x = bn(x, "norm").flatten(2).mean(-1)
    return F.linear(x, sd["head.weight"], sd["head.bias"])


def _uniformer_checkpoint(name: str, seed: int = 0, **kwargs):
    """A random all-SA StructViT (= UniFormer) and its state dict wrapped as UniFormer ships it."""
    torch.manual_seed(seed)
    sa = randomise_bn(timm.create_model(name, struct_blocks=(0, 0), **kwargs), seed).eval()
    return sa, {"model": {k: v.clone() for k, v in sa.state_dict().items()}}


@pytest.mark.parametrize("name,shape", [("structvit_tiny", (2, 3, 64, 64)), ("structvit_tiny_video", (2, 3, 4, 64, 64))])
def test_structvit_sa_matches_functional_uniformer(name, shape):
    sa, ckpt = _uniformer_checkpoint(name)
    sd = _Tracked({k: v for k, v in ckpt["model"].items() if not k.endswith("num_batches_tracked")})
    x = torch.randn(shape)
    ref = uniformer_reference(sd, x, sa.depths, sa.head_dim)
    assert sd.used == set(sd), f"unused checkpoint tensors: {sorted(set(sd) - sd.used)[:5]}"
    with torch.no_grad():
        assert torch.allclose(sa(x), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name,shape,kwargs", [
    ("structvit_tiny", (2, 3, 64, 64), dict(struct_blocks="all")),
    ("structvit_tiny", (2, 3, 64, 64), dict(struct_blocks=(1, 1), attention="convsa")),
    ("structvit_tiny", (2, 3, 64, 64), dict(struct_blocks="all", normalize="per_pattern", num_patterns=4)),
    ("structvit_tiny", (2, 3, 64, 64), dict(struct_blocks="all", patterns="head", num_patterns=2)),
    ("structvit_tiny", (2, 3, 64, 64), dict(struct_blocks="all", patterns="shared", backend="keyconv")),
    ("structvit_tiny_video", (2, 3, 4, 64, 64), dict(struct_blocks="all")),
    ("structvit_tiny_video", (1, 3, 4, 64, 64), dict(struct_blocks=(1, 1), attention="convsa", window=(3, 5, 5))),
])
def test_conversion_reproduces_uniformer(name, shape, kwargs):
    sa, ckpt = _uniformer_checkpoint(name)
    torch.manual_seed(123)
    model = timm.create_model(name, **kwargs).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        expected = sa(x)
        assert not torch.allclose(model(x), expected, atol=1e-3)  # different before conversion
        report = load_uniformer(model, ckpt)
        got = model(x)
    assert isinstance(report, ConversionReport)
    n_struct = sum(isinstance(m, StructSA) for m in model.modules())
    assert n_struct > 0 and len(report.sa_initialised) == n_struct
    assert not report.missing and not report.unexpected and not report.inflated
    assert report.exact and "exact" in str(report)
    assert torch.allclose(got, expected, atol=2e-5, rtol=1e-4), (got - expected).abs().max()
    # the D patterns are SA-equivalent but not identical (they get different gradients)
    attn = next(m for m in model.modules() if isinstance(m, StructSA))
    if attn.num_patterns > 1:
        assert not torch.allclose(attn.u_v.select(attn.pattern_dim, 0), attn.u_v.select(attn.pattern_dim, 1))


@pytest.mark.parametrize("name,shape,kwargs", [
    ("structvit_tiny", (2, 3, 64, 64), {}),
    ("structvit_tiny", (2, 3, 64, 64), dict(patterns="head", normalize="per_pattern")),
    ("structvit_tiny_video", (1, 3, 4, 64, 64), {}),
])
def test_conversion_exact_in_float64(name, shape, kwargs):
    """The channel-wise (paper) models, converted from UniFormer in float64: the logits
    agree to ~1e-10 (the patterns are reset after .double(), so the zero-sum
    perturbations are exact in float64)."""
    torch.manual_seed(0)
    sa = randomise_bn(timm.create_model(name, struct_blocks=(0, 0))).double().eval()
    model = timm.create_model(name, **kwargs).double().eval()
    attn = next(m for m in model.modules() if isinstance(m, StructSA))
    assert attn.patterns == kwargs.get("patterns", "channel") and attn.num_patterns == 4
    if attn.patterns == "channel":
        assert attn.u_k.shape == (attn.num_heads, attn.head_dim, 4) + attn.window
    report = load_uniformer(model, {"model": sa.state_dict()})
    assert report.exact and report.sa_initialised
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        assert (model(x) - sa(x)).abs().max() < 1e-10


def test_strided_conversion_is_an_initialisation(caplog):
    """kv_stride 2 (the X-D-2 models): the weights load and the model runs, but it sees
    fewer keys than SA; the report and a logged warning say it is an initialisation."""
    sa, ckpt = _uniformer_checkpoint("structvit_tiny")
    model = timm.create_model("structvit_tiny", kv_stride=2).eval()
    with caplog.at_level("WARNING", logger="structvit.conversion"):
        report = load_uniformer(model, ckpt)
    assert not report.exact and any("stride" in r for r in report.inexact)
    assert "not an exact conversion" in str(report)
    assert any("initialisation, not an exact conversion" in r.getMessage() for r in caplog.records)
    assert len(report.sa_initialised) == sum(isinstance(m, StructSA) for m in model.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
    assert out.shape == sa(x).shape and torch.isfinite(out).all()
    caplog.clear()
    with caplog.at_level("WARNING", logger="structvit.conversion"):  # stride 1: exact, nothing logged
        assert load_uniformer(timm.create_model("structvit_tiny"), ckpt).exact
    assert not caplog.records


def test_conversion_keeps_structvit_patterns():
    """A StructViT checkpoint's own patterns load as they are (no SA reset)."""
    torch.manual_seed(0)
    src = randomise_bn(timm.create_model("structvit_tiny", struct_blocks=(1, 1))).eval()
    dst = timm.create_model("structvit_tiny", struct_blocks=(1, 1)).eval()
    report = load_uniformer(dst, src.state_dict())
    assert report.sa_initialised == []
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(dst(x), src(x), atol=1e-6)


def test_unwrap_state_dict():
    sd = {"a.weight": torch.ones(2)}
    assert unwrap_state_dict({"model": sd}) == sd
    assert unwrap_state_dict({"model_state": sd, "epoch": 3}) == sd
    assert list(unwrap_state_dict({"module.a.weight": torch.ones(2)})) == ["a.weight"]
    with pytest.raises(TypeError, match="state dict"):
        unwrap_state_dict([1, 2])
    with pytest.raises(ValueError, match="no tensors"):
        unwrap_state_dict({"epoch": 3})


def test_size_mismatch_names_the_layer():
    _, small = _uniformer_checkpoint("structvit_tiny")
    other = timm.create_model("structvit_tiny", embed_dims=(32, 64, 160, 256))
    with pytest.raises(ValueError, match=r"size mismatch in layer 'patch_embed3\.proj'"):
        load_uniformer(other, small)
    fewer = timm.create_model("structvit_tiny", num_classes=10)
    with pytest.raises(ValueError, match=r"layer 'head'.*ignore_head"):
        load_uniformer(fewer, small)
    report = load_uniformer(fewer, small, ignore_head=True, strict=False)
    assert report.missing == ["head.weight", "head.bias"]
    video = timm.create_model("structvit_tiny_video")
    with pytest.raises(ValueError, match=r"patch_embed1\.proj.*inflate="):
        load_uniformer(video, small)


def test_missing_and_unexpected_keys():
    _, ckpt = _uniformer_checkpoint("structvit_tiny")
    sd = dict(ckpt["model"])
    sd["blocks9.0.extra.weight"] = torch.zeros(3)
    del sd["blocks2.0.conv1.bias"]
    model = timm.create_model("structvit_tiny")
    with pytest.raises(KeyError) as err:
        load_uniformer(model, sd)
    msg = str(err.value)
    assert "blocks9.0.extra.weight" in msg and "blocks2.0.conv1.bias" in msg and "missing" in msg
    report = load_uniformer(model, sd, strict=False)
    assert report.unexpected == ["blocks9.0.extra.weight"] and report.missing == ["blocks2.0.conv1.bias"]
    assert "blocks9.0.extra.weight" in str(report)
    with pytest.raises(ValueError, match="inflate"):
        load_uniformer(model, sd, inflate="middle")


def test_inflate_weight_modes():
    w = torch.randn(4, 1, 3, 3)
    c = inflate_weight(w, 3, "center")
    assert c.shape == (4, 1, 3, 3, 3) and torch.equal(c[:, :, 1], w) and c[:, :, [0, 2]].abs().sum() == 0
    a = inflate_weight(w, 3, "average")
    assert torch.allclose(a.sum(2), w) and torch.allclose(a[:, :, 0], w / 3)
    with pytest.raises(ValueError, match="inflate"):
        inflate_weight(w, 3, "mean")
    with pytest.raises(ValueError, match="2-D kernel"):
        inflate_weight(torch.randn(4, 3), 3)
    u = torch.randn(2, 8, 4, 3, 3)  # channel-wise patterns (heads, C, D, kh, kw)
    assert torch.equal(inflate_weight(u, 3, "center")[..., 1, :, :], u)
    assert inflate_weight(u, 5, "average").shape == (2, 8, 4, 5, 3, 3)


@pytest.mark.parametrize("struct_blocks", [(0, 0), "all"])
def test_center_inflation_static_clip_equals_image(struct_blocks):
    """Center inflation: on a clip of T identical frames the video model's logits equal the
    image model's on that frame (exact up to float error), with SA and with StructSA blocks
    (patterns inflated too), for any T."""
    torch.manual_seed(0)
    image = randomise_bn(timm.create_model("structvit_tiny", struct_blocks=struct_blocks, num_classes=10)).eval()
    video = timm.create_model("structvit_tiny_video", struct_blocks=struct_blocks, num_classes=10).eval()
    report = load_uniformer(video, {"model": image.state_dict()}, inflate="center")
    assert "patch_embed1.proj.weight" in report.inflated and "blocks1.0.attn.weight" in report.inflated
    if struct_blocks == "all":
        assert "blocks3.0.attn.u_k" in report.inflated and report.sa_initialised == []
    frame = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = image(frame)
        for t in (2, 4, 5):
            clip = frame.unsqueeze(2).expand(-1, -1, t, -1, -1).contiguous()
            assert torch.allclose(video(clip), expected, atol=2e-5, rtol=1e-4), t


def test_average_inflation_loads_and_keeps_kernel_sums():
    """Average inflation (UniFormer's / I3D's): every 3-D kernel sums over time to the 2-D one.
    Static-clip outputs then match only away from the temporal zero padding, so no equality
    of logits is claimed."""
    torch.manual_seed(0)
    image = timm.create_model("structvit_tiny", struct_blocks=(0, 0), num_classes=10)
    video = timm.create_model("structvit_tiny_video", struct_blocks=(0, 0), num_classes=10)
    report = load_uniformer(video, image.state_dict(), inflate="average")
    for name in report.inflated:
        w3 = video.state_dict()[name]
        assert torch.allclose(w3.sum(2), image.state_dict()[name], atol=1e-6), name
    assert video.blocks1[0].attn.weight.shape[2] == 5


def test_convert_cli(tmp_path, capsys):
    sa, ckpt = _uniformer_checkpoint("structvit_tiny", num_classes=10)
    src = tmp_path / "uniformer.pth"
    torch.save(ckpt, src)
    out = tmp_path / "structvit.safetensors"
    assert main([str(src), str(out), "--model", "structvit_tiny", "--struct-blocks", "1,1"]) == 0
    printed = capsys.readouterr().out
    assert "SA-equivalent patterns in 2" in printed and "saved" in printed
    tensors = load_file(str(out))
    assert "blocks3.1.attn.u_k" in tensors and tensors["head.weight"].shape == (10, 256)
    model = timm.create_model("structvit_tiny", struct_blocks=(1, 1), num_classes=10).eval()
    model.load_state_dict(tensors)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), sa(x), atol=2e-5, rtol=1e-4)
    # an image checkpoint into a video model: refused without --inflate, fine with it
    out_v = tmp_path / "video.safetensors"
    assert main([str(src), str(out_v), "--model", "structvit_tiny_video"]) == 1
    assert "inflate" in capsys.readouterr().err
    assert main([str(src), str(out_v), "--model", "structvit_tiny_video", "--inflate", "center", "--num-frames", "8"]) == 0
    assert load_file(str(out_v))["patch_embed1.proj.weight"].shape == (32, 3, 3, 4, 4)
    # a pickle with non-tensor objects is refused unless trusted
    import argparse as _argparse

    pickled = tmp_path / "with_args.pth"
    torch.save({"model": ckpt["model"], "args": _argparse.Namespace(lr=1.0)}, pickled)
    assert main([str(pickled), str(out), "--model", "structvit_tiny"]) == 1
    assert "--trust-checkpoint" in capsys.readouterr().err
    assert main([str(pickled), str(out), "--model", "structvit_tiny", "--trust-checkpoint"]) == 0
    assert main([str(tmp_path / "nope.pth"), str(out), "--model", "structvit_tiny"]) == 1
    with pytest.raises(SystemExit):
        main([str(src), str(tmp_path / "x.pth"), "--model", "structvit_tiny"])
    with pytest.raises(SystemExit):
        main([str(src), str(out), "--model", "resnet50"])


# --------------------------------------------------------------------------- DeiT / timm ViT -> StructDeiT


@pytest.fixture(scope="module")
def deit_small_64():
    """A random DeiT-S (timm's, no download) at 64x64 and its checkpoint as DeiT ships it."""
    torch.manual_seed(0)
    deit = timm.create_model("deit_small_patch16_224", pretrained=False, img_size=64).eval()
    with torch.no_grad():  # a visible class token and position embedding
        deit.cls_token.normal_()
        deit.pos_embed.normal_(std=0.5)
    return deit, {"model": {k: v.clone() for k, v in deit.state_dict().items()}}


def test_deit_checkpoint_reproduces_deit(deit_small_64):
    """Same names as timm's VisionTransformer: DeiT-S loads strictly into the SA model with a
    class token and computes the same logits."""
    deit, ckpt = deit_small_64
    model = timm.create_model("structvit_deit_small", img_size=64, attention="sa", class_token=True).eval()
    report = load_deit(model, ckpt)
    assert report.exact and not report.missing and not report.unexpected and not report.sa_initialised
    assert len(report.loaded) == len(ckpt["model"])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), deit(x), atol=1e-5, rtol=1e-4)


def test_deit_checkpoint_into_structsa(deit_small_64):
    deit, ckpt = deit_small_64
    sd = ckpt["model"]
    model = timm.create_model("structvit_deit_small", img_size=64).eval()  # StructSA, no class token
    report = load_deit(model, ckpt)
    assert len(report.sa_initialised) == 12 and not report.missing and not report.unexpected
    assert not report.exact and any("class token" in r for r in report.inexact)
    assert torch.equal(model.pos_embed, sd["pos_embed"][:, 1:]) and model.cls_token is None
    assert torch.equal(model.blocks[3].attn.qkv.weight, sd["blocks.3.attn.qkv.weight"])
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 64, 64))).all()
    # a class token: its pos_embed row is kept, but StructSA's patch tokens no longer see it
    with_cls = timm.create_model("structvit_deit_small", img_size=64, class_token=True)
    report = load_deit(with_cls, ckpt)
    assert torch.equal(with_cls.pos_embed, sd["pos_embed"]) and torch.equal(with_cls.cls_token, sd["cls_token"])
    assert not report.exact and any("do not attend" in r for r in report.inexact)


def test_deit_224_checkpoint_full_size_and_resampled():
    """The 224x224 DeiT-S state dict (built, never run) loads as it is into structvit_deit_small,
    and into a 64x64 model with the grid rows of its position embedding resampled."""
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    sd = timm.create_model("deit_small_patch16_224", pretrained=False).state_dict()
    full = timm.create_model("structvit_deit_small", attention="convsa", class_token=True)
    report = load_deit(full, sd)
    assert not report.missing and len(report.sa_initialised) == 12 and not report.notes
    assert torch.equal(full.pos_embed, sd["pos_embed"]) and torch.equal(full.norm.weight, sd["norm.weight"])
    small = timm.create_model("structvit_deit_small", img_size=64, attention="sa")
    report = load_deit(small, sd)
    assert any("14x14 to a 4x4" in n for n in report.notes) and not report.exact
    expected = resample_abs_pos_embed(sd["pos_embed"], [4, 4], num_prefix_tokens=1)[:, 1:]
    assert small.pos_embed.shape == (1, 16, 384) and torch.allclose(small.pos_embed, expected)
    distilled = dict(sd, dist_token=torch.zeros(1, 1, 384), **{"head_dist.weight": torch.zeros(1000, 384),
                                                               "head_dist.bias": torch.zeros(1000)})
    distilled["pos_embed"] = torch.cat([sd["pos_embed"][:, :1], torch.zeros(1, 1, 384), sd["pos_embed"][:, 1:]], 1)
    report = load_deit(full, distilled)
    assert not report.unexpected and torch.equal(full.pos_embed, sd["pos_embed"])
    assert any("distillation" in n for n in report.notes)
    bad = dict(sd, pos_embed=sd["pos_embed"][:, :-1])
    with pytest.raises(ValueError, match="not a square grid"):
        load_deit(full, bad)


def test_deit_image_to_video_static_clip_equals_image():
    """Centre inflation of the tubelet embedding and the StructSA windows, zero time embedding:
    a clip of identical frames gives the image model's logits."""
    torch.manual_seed(0)
    image = timm.create_model("structvit_deit_tiny", num_classes=10).eval()
    video = timm.create_model("structvit_deit_tiny_video", num_classes=10).eval()
    with pytest.raises(ValueError, match=r"patch_embed\.proj.*inflate="):
        load_deit(video, image.state_dict())
    report = load_deit(video, image.state_dict(), inflate="center")
    assert {"patch_embed.proj.weight", "blocks.0.attn.u_k", "blocks.3.attn.u_v"} <= set(report.inflated)
    assert report.sa_initialised == [] and any("time_embed" in n for n in report.notes) and report.exact
    assert video.time_embed.abs().sum() == 0
    frame = torch.randn(2, 3, 32, 32)
    clip = frame.unsqueeze(2).expand(-1, -1, 8, -1, -1).contiguous()
    with torch.no_grad():
        assert torch.allclose(video(clip), image(frame), atol=2e-5, rtol=1e-4)
    assert not load_deit(video, image.state_dict(), inflate="average").exact


def test_convert_cli_deit(tmp_path, capsys):
    torch.manual_seed(0)
    sa = timm.create_model("structvit_deit_tiny", attention="sa", num_classes=10).eval()
    src = tmp_path / "deit_sa.pth"
    torch.save({"model": sa.state_dict()}, src)
    out = tmp_path / "deit_structsa.safetensors"
    assert main([str(src), str(out), "--model", "structvit_deit_tiny"]) == 0
    assert "exact: the converted model" in capsys.readouterr().out
    model = timm.create_model("structvit_deit_tiny", num_classes=10).eval()
    model.load_state_dict(load_file(str(out)))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), sa(x), atol=2e-5, rtol=1e-4)
    assert main([str(src), str(out), "--model", "structvit_deit_tiny", "--class-token"]) == 0
    printed = capsys.readouterr().out
    assert "not an exact conversion" in printed and "class token is new" in printed
    with pytest.raises(SystemExit):
        main([str(src), str(out), "--model", "structvit_deit_tiny", "--struct-blocks", "1,1"])
    with pytest.raises(SystemExit):
        main([str(src), str(out), "--model", "structvit_tiny", "--attention", "sa"])
