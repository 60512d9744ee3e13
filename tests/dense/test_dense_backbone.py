"""The dense-prediction backbones: windowed (h14 / h32) attention, stage norms, padding, the
registered names, loading classification weights, and the FPN module."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

import structvit  # noqa: F401  (registers the models)
from structvit.dense.backbone import build_fpn_backbone, load_classification_weights
from structvit.models import DENSE_MODELS, StructViT
from structvit.models.structvit import window_merge, window_partition

DENSE_NAMES = ("structvit_s_4_1_h14", "structvit_b_4_1_h14", "structvit_s_4_1_h32", "structvit_b_4_1_h32")


def _tiny(**kwargs) -> StructViT:
    torch.manual_seed(0)
    return timm.create_model("structvit_tiny", **kwargs).double().eval()


def _randomise_norms(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g, dtype=m.weight.dtype))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype))


@pytest.mark.parametrize("grid,ws", [((5, 7), 3), ((6, 6), 3), ((2, 9), 4), ((4, 4), 8)])
def test_window_partition_pads_and_merge_crops(grid, ws):
    h, w = grid
    t = torch.randn(2, h * w, 3)
    win = window_partition(t, list(grid), ws)
    n_windows = -(-h // ws) * -(-w // ws)
    assert win.shape == (2 * n_windows, ws * ws, 3)
    assert torch.equal(window_merge(win, list(grid), ws), t)
    # window (0, 0) of image 0 holds the top-left ws x ws tokens, zeros where the map ends
    first = win[0].reshape(ws, ws, 3)
    m = t[0].reshape(h, w, 3)
    assert torch.equal(first[:min(h, ws), :min(w, ws)], m[:ws, :ws])
    assert (first[min(h, ws):] == 0).all() and (first[:, min(w, ws):] == 0).all()


@pytest.mark.parametrize("window_conv", ["window", "map"])
@pytest.mark.parametrize("struct_blocks", ["all", (0, 0)])
def test_one_window_covering_the_map_is_global_attention(window_conv, struct_blocks):
    """64 x 64 input: stage 3 is 4 x 4 tokens; a 4 x 4 window is the whole map (float64, exact)."""
    ref = _tiny(struct_blocks=struct_blocks)
    win = _tiny(struct_blocks=struct_blocks, window_size=4, window_pattern="all", window_conv=window_conv)
    win.load_state_dict(ref.state_dict())
    _randomise_norms(ref)
    win.load_state_dict(ref.state_dict())
    assert all(blk.window_size == 4 for blk in win.blocks3)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    torch.testing.assert_close(win(x), ref(x), rtol=1e-10, atol=1e-10)


def test_windowed_block_is_attention_within_each_zero_padded_window():
    """A 5 x 7 map in 3 x 3 windows (padded to 6 x 9): each window's output is the layer run on
    that window alone as a 3 x 3 grid, padded tokens zero (they take part as keys)."""
    model = _tiny(window_size=3, window_pattern="all")
    blk = model.blocks3[0]
    x = torch.randn(1, 128, 5, 7, dtype=torch.float64)
    out = blk(x)
    # reference: the block's steps written out window by window
    y = x + blk.pos_embed(x)
    t = blk.norm1(y.flatten(2).transpose(1, 2)).reshape(1, 5, 7, 128)
    padded = torch.zeros(1, 6, 9, 128, dtype=torch.float64)
    padded[:, :5, :7] = t
    attn = torch.zeros_like(padded)
    for i in range(0, 6, 3):
        for j in range(0, 9, 3):
            win = padded[:, i:i + 3, j:j + 3].reshape(1, 9, 128)
            attn[:, i:i + 3, j:j + 3] = blk.attn(win, [3, 3]).reshape(1, 3, 3, 128)
    tok = y.flatten(2).transpose(1, 2) + attn[:, :5, :7].reshape(1, 35, 128)
    tok = tok + blk.mlp(blk.norm2(tok))
    torch.testing.assert_close(out, tok.transpose(1, 2).reshape(x.shape), rtol=1e-10, atol=1e-10)


def test_window_conv_map_sees_the_neighbouring_window_and_window_does_not():
    """Changing a token just right of window (0, 0)'s edge moves that window's outputs with
    window_conv="map" (the 3x3 key/value patterns reach across), never with "window"."""
    x = torch.randn(1, 128, 4, 8, dtype=torch.float64)
    x2 = x.clone()
    # column 4 = first column of window (0, 1); not a constant shift, which norm1 would remove
    x2[:, :, 1, 4] += torch.randn(128, dtype=torch.float64)
    for conv, moves in (("window", False), ("map", True)):
        blk = _tiny(window_size=4, window_pattern="all", window_conv=conv).blocks3[0]
        # pos_embed (3x3) would also carry the change across: zero it to isolate the attention
        with torch.no_grad():
            blk.pos_embed.weight.zero_()
            blk.pos_embed.bias.zero_()
        delta = (blk(x2) - blk(x))[:, :, :, :4].abs().max().item()
        assert (delta > 1e-8) == moves, (conv, delta)


def test_hybrid_pattern_places_global_blocks_every_fourth():
    with torch.device("meta"):
        s = timm.create_model("structvit_s_4_1_h32")
        b = timm.create_model("structvit_b_4_1_h14")
    assert [blk.window_size for blk in s.blocks3] == [32, 32, 32, None] * 2
    assert [blk.window_size for blk in b.blocks3] == [14, 14, 14, None] * 5
    assert all(blk.window_size is None for blk in s.blocks4)
    s.set_window_size(None)
    assert all(blk.window_size is None for blk in s.blocks3)
    s.set_window_size(16)
    assert [blk.window_size for blk in s.blocks3] == [16, 16, 16, None] * 2


@pytest.mark.parametrize("size", [(64, 64), (67, 93), (33, 150)])
def test_features_at_strides_4_to_32_at_any_size(size):
    """The dense backbone pads its input to a multiple of 32: maps of ceil(H / s) x ceil(W / s)."""
    model = timm.create_model("structvit_tiny", dense=True, window_size=2, features_only=True).eval()
    assert model.feature_info.channels() == [32, 64, 128, 256]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    feats = model(torch.randn(1, 3, *size))
    h, w = size
    assert [tuple(f.shape) for f in feats] == [(1, c, -(-h // s), -(-w // s))
                                               for c, s in zip([32, 64, 128, 256], [4, 8, 16, 32])]


def test_stage_norms_are_uniformers_layernorms_on_every_output():
    model = _tiny(dense=True)
    _randomise_norms(model)
    for s in range(4):
        norm = getattr(model, f"norm{s + 1}")
        assert isinstance(norm, torch.nn.LayerNorm) and norm.eps == 1e-6
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    plain = _tiny()
    plain.load_state_dict(model.state_dict(), strict=False)  # all but norm1..norm4
    raw = plain.forward_intermediates(x, intermediates_only=True)
    normed = model.forward_intermediates(x, intermediates_only=True)
    for s, (r, n) in enumerate(zip(raw, normed)):
        want = torch.nn.functional.layer_norm(r.permute(0, 2, 3, 1), (r.shape[1],),
                                              getattr(model, f"norm{s + 1}").weight,
                                              getattr(model, f"norm{s + 1}").bias, 1e-6).permute(0, 3, 1, 2)
        torch.testing.assert_close(n, want, rtol=1e-10, atol=1e-10)


def test_classification_weights_load_unchanged(tmp_path):
    """A classifier's .safetensors loads into the dense backbone: all its tensors but norm / head,
    only norm1..norm4 new; the stage maps before the norms are the classifier's."""
    clf = _tiny()
    _randomise_norms(clf)
    path = tmp_path / "clf.safetensors"
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(path))
    torch.manual_seed(123)
    dense = timm.create_model("structvit_tiny", dense=True, window_size=2).double().eval()
    report = load_classification_weights(dense, str(path))
    assert sorted({k.split(".")[0] for k in report.missing}) == ["norm1", "norm2", "norm3", "norm4"]
    assert report.unexpected == [] and report.sa_initialised == []
    for k, v in clf.state_dict().items():
        torch.testing.assert_close(dense.state_dict()[k], v, rtol=0, atol=0)
    # the FPN backbone drops the classifier: its checkpoint tensors are reported unexpected
    fpn = build_fpn_backbone("structvit_tiny", dense=True, window_size=4, max_pool=False)
    fpn.body.double().eval()
    report = load_classification_weights(fpn.body, clf.state_dict())
    assert sorted({k.split(".")[0] for k in report.unexpected}) == ["head", "norm"]
    # window covering the map: the dense model's pre-norm maps are the classifier's
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    want = clf.forward_intermediates(x, intermediates_only=True)
    fpn.body.dense = False  # read the maps before the stage norms
    got = fpn.features(x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_another_models_weights_are_refused():
    other = timm.create_model("structvit_tiny", depths=(1, 1, 1, 1))
    dense = timm.create_model("structvit_tiny", dense=True)
    with pytest.raises(ValueError, match="not a checkpoint of this backbone"):
        load_classification_weights(dense, other.state_dict())


def test_fpn_backbone_levels_and_channels():
    fpn = build_fpn_backbone("structvit_tiny", dense=True, window_size=2).eval()
    assert fpn.out_channels == 256 and fpn.strides == [4, 8, 16, 32]
    out = fpn(torch.randn(1, 3, 70, 100))
    assert list(out) == ["0", "1", "2", "3", "pool"]
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(18, 25), (9, 13), (5, 7), (3, 4), (2, 2)]
    assert all(v.shape[1] == 256 for v in out.values())
    with pytest.raises(ValueError, match="registered backbone"):
        build_fpn_backbone("resnet_does_not_exist")


@pytest.mark.parametrize("bad,match", [(dict(window_size=0), "window_size"), (dict(window_size=2.5), "window_size"),
                                       (dict(window_pattern="odd"), "window_pattern"),
                                       (dict(window_conv="grid"), "window_conv"), (dict(dense=1), "dense")])
def test_bad_window_options_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model("structvit_tiny", **bad)
    with pytest.raises(ValueError, match="window_size|dense"):
        timm.create_model("structvit_tiny_video", window_size=4)


def test_window_conv_map_needs_stride_one():
    model = _tiny(window_size=2, window_conv="map", kv_stride=2)
    with pytest.raises(ValueError, match="kv_stride"):
        model(torch.randn(1, 3, 64, 64, dtype=torch.float64))


@pytest.mark.parametrize("name", DENSE_NAMES)
def test_registered_dense_names_through_timms_contract(name):
    """Created by name (meta device), classify at the default input, features_only gives the
    four normalised maps; struct_blocks=(0, 0) is the UniFormer baseline."""
    size, d, stride, window = DENSE_MODELS[name]
    assert name in timm.list_models("structvit_*")
    with torch.device("meta"):
        model = timm.create_model(name)
        feats = timm.create_model(name, features_only=True)
        baseline = timm.create_model(name, struct_blocks=(0, 0))
    assert model.dense and model.window_size == window and model.num_patterns == d
    assert model.embed_dims == (64, 128, 320, 512) and model.depths[2] == (8 if size == "s" else 20)
    c, h, w = model.pretrained_cfg["input_size"]
    x = torch.zeros(1, c, h, w, device="meta")
    assert model(x).shape == (1, 1000)
    assert feats.feature_info.channels() == [64, 128, 320, 512]
    assert feats.feature_info.reduction() == [4, 8, 16, 32]
    assert [tuple(f.shape) for f in feats(x)] == [(1, ch, h // s, w // s) for ch, s in
                                                 zip([64, 128, 320, 512], [4, 8, 16, 32])]
    assert not hasattr(feats, "head") or not any(k.startswith("head") for k in feats.state_dict())
    assert set(baseline.block_kinds[2]) == {"sa"}


def test_tiny_dense_model_trains():
    """One backward pass through windowed StructSA with padding reaches every parameter."""
    model = timm.create_model("structvit_tiny", dense=True, window_size=3, window_conv="window", features_only=True)
    feats = model(torch.randn(2, 3, 80, 72))
    sum(f.square().mean() for f in feats).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


def test_uniformer_weights_start_the_structsa_backbone_sa_equivalent():
    """An SA (UniFormer) classifier's state dict into the StructSA dense backbone: the patterns
    start SA-equivalent, so (one window covering the map) the pre-norm maps are UniFormer's."""
    sa = _tiny(struct_blocks=(0, 0))
    _randomise_norms(sa)
    dense = timm.create_model("structvit_tiny", dense=True, window_size=4).double().eval()
    report = load_classification_weights(dense, {"model": sa.state_dict()})  # UniFormer's release wrapper
    assert len(report.sa_initialised) == 3  # blocks3.0, blocks3.1, blocks4.0
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    want = sa.forward_intermediates(x, intermediates_only=True)
    dense.dense = False  # the maps before the stage norms
    for got, ref in zip(dense.forward_intermediates(x, intermediates_only=True), want):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
