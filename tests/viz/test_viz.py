"""Figures of structvit.viz: produced from tiny models, and plotting the op's actual attention."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

import timm  # noqa: E402

import structvit.models  # noqa: E402,F401
from structvit.ops import struct_attention  # noqa: E402
from structvit.viz import attention_layers, write_demo_figures  # noqa: E402
from structvit.viz import cli as viz_cli  # noqa: E402
from structvit.viz.figures import attention_figure, kernels_figure  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _image_model(**kw):
    torch.manual_seed(0)
    return timm.create_model("structvit_tiny", num_classes=10, **kw).eval()


def _video_model(**kw):
    torch.manual_seed(1)
    return timm.create_model("structvit_tiny_video", num_classes=10, num_frames=4, **kw).eval()


@pytest.fixture(scope="module")
def image_case(tmp_path_factory):
    model = _image_model()
    x = viz_cli.load_sample(model, sample="builtin:digits:5", size=(64, 64))
    out = tmp_path_factory.mktemp("img")
    paths = write_demo_figures(model, x, out, block=1, query=(1, 2), head=1)
    return model, x, paths


@pytest.fixture(scope="module")
def video_case(tmp_path_factory):
    model = _video_model(window=(3, 3, 3))
    x = viz_cli.load_sample(model, sample="builtin:moving_digits:2", size=(64, 64))
    out = tmp_path_factory.mktemp("vid")
    paths = write_demo_figures(model, x, out, block=0, query=(1, 2, 1))
    return model, x, paths


def _inputs(model, x, block):
    """Independently capture the input tokens and grid of attention block ``block``."""
    name, layer = attention_layers(model)[block]
    seen = {}
    h = layer.register_forward_pre_hook(lambda m, args: seen.setdefault("in", (args[0].detach(), tuple(args[1]))))
    with torch.no_grad():
        model(x.unsqueeze(0))
    h.remove()
    return layer, *seen["in"]


def _op_weights(layer, tokens, grid, normalize=None):
    """The weights (B, heads, N, D, N') from the public op, naive backend, with the layer's own parameters."""
    with torch.no_grad():
        q, k, v = layer._qkv(tokens)
        _, w = struct_attention(q, k, v, layer.u_k, layer.u_v, grid, kv_stride=layer.kv_stride,
                                normalize=normalize or layer.normalize, backend="naive", scale=layer.scale,
                                return_weights=True)
    return w


def _kappa(w_dj, u_v, head):
    """kappa[c] = sum_d A[d] u_v[head, c, d] of a channel-wise layer's u_v (heads, C, D, *window)."""
    return torch.einsum("d,cd...->c...", w_dj, u_v[head].detach())


def _valid_png(path):
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 300 and im.size[1] > 200


def test_demo_figures_written(image_case, video_case):
    for _, _, paths in (image_case, video_case):
        assert [p.stem.split("_", 1)[1] for p in paths] == ["attention", "kernels", "compare", "readings"]
        for p in paths:
            _valid_png(p)
            assert p.with_suffix(".npz").is_file()
    _, _, (att, ker, cmp_, rd) = image_case
    a = np.load(att.with_suffix(".npz"))
    assert a["attention"].shape == (4, 1, 4, 4)  # D, T, H, W for a 64x64 input (stage 3: 4x4 tokens)
    assert a["attention_all_heads"].shape == (4, 4, 1, 4, 4)
    assert a["u_v"].shape == a["u_k"].shape == a["u_v_std"].shape == (4, 1, 3, 3)  # channel mean and std
    assert a["u_v_channels"].shape == (32, 4, 1, 3, 3) and str(a["patterns"]) == "channel"
    assert a["kappa"].shape == (4, 1, 3, 3) and a["kappa_channels"].shape == (4, 32, 1, 3, 3)
    assert a["top_keys"].shape == (4, 3) and int(a["channel"]) == -1
    assert tuple(a["query"]) == (0, 1, 2) and tuple(a["grid"]) == (1, 4, 4) and int(a["head"]) == 1
    assert tuple(a["key_grid"]) == (1, 4, 4) and tuple(a["kv_stride"]) == (1, 1, 1)
    c = np.load(cmp_.with_suffix(".npz"))
    assert c["attention"].shape == (3, 1, 4, 4) and list(c["kinds"]) == ["sa", "convsa", "structsa"]
    _, _, (vatt, vker, vcmp, vrd) = video_case
    v = np.load(vker.with_suffix(".npz"))
    assert v["attention"].shape == (2, 4, 4)  # 4 frames -> 2 time steps of the key grid
    assert v["kappa"].shape == (4, 3, 3, 3)  # kappa over the (t, h, w) window
    assert np.load(vcmp.with_suffix(".npz"))["attention"].shape == (3, 2, 4, 4)


def test_image_figure_numbers_are_the_ops_attention(image_case):
    model, x, (att, ker, cmp_, rd) = image_case
    layer, tokens, grid = _inputs(model, x, 1)
    assert grid == (4, 4) and layer.patterns == "channel"
    w = _op_weights(layer, tokens, grid)
    qi = 1 * 4 + 2
    want = w[0, 1, qi].reshape(4, 1, 4, 4).numpy()  # head 1, query (1, 2)
    a = np.load(att.with_suffix(".npz"))
    np.testing.assert_allclose(a["attention"], want, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(a["shares"], want.reshape(4, -1).sum(1), rtol=1e-4)
    assert layer.normalize == "joint" and abs(a["shares"].sum() - 1) < 1e-5  # one distribution over (d, j)
    u_v = layer.u_v[1].detach()  # (C, D, 3, 3)
    np.testing.assert_allclose(a["u_v"][:, 0], u_v.mean(0).numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(a["u_v_std"][:, 0], u_v.numpy().std(0), rtol=1e-4, atol=1e-7)
    for key, kap, kap_c in zip(a["top_keys"], a["kappa"], a["kappa_channels"]):
        j = key[1] * 4 + key[2]
        expect = _kappa(w[0, 1, qi, :, j], layer.u_v, 1)  # (C, 3, 3): one kernel per channel
        np.testing.assert_allclose(kap_c[:, 0], expect.numpy(), rtol=1e-4, atol=1e-8)
        np.testing.assert_allclose(kap[0], expect.mean(0).numpy(), rtol=1e-4, atol=1e-8)
    mass = want.sum(0).reshape(-1)
    assert mass[a["top_keys"][0][1] * 4 + a["top_keys"][0][2]] == pytest.approx(mass.max(), rel=1e-5)
    r = np.load(rd.with_suffix(".npz"))
    wp = _op_weights(layer, tokens, grid, normalize="per_pattern")
    np.testing.assert_allclose(r["joint"], want, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(r["per_pattern"], wp[0, 1, qi].reshape(4, 1, 4, 4).numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(r["per_pattern"].reshape(4, -1).sum(1), 1.0, rtol=1e-5)  # each map sums to 1
    c = np.load(cmp_.with_suffix(".npz"))
    np.testing.assert_allclose(c["attention"][2], want.sum(0), rtol=1e-4, atol=1e-7)  # StructSA row: sum over d


def test_video_figure_numbers_are_the_ops_attention(video_case):
    model, x, (att, ker, cmp_, rd) = video_case
    layer, tokens, grid = _inputs(model, x, 0)
    assert grid == (2, 4, 4)
    w = _op_weights(layer, tokens, grid)
    qi = (1 * 4 + 2) * 4 + 1
    want = w[0, 0, qi]  # (D, N), head 0
    k = np.load(ker.with_suffix(".npz"))
    np.testing.assert_allclose(k["attention_patterns"], want.reshape(4, 2, 4, 4).numpy(), rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(k["attention"], want.sum(0).reshape(2, 4, 4).numpy(), rtol=1e-4, atol=1e-8)
    for key, kap in zip(k["top_keys"], k["kappa"]):
        j = (key[0] * 4 + key[1]) * 4 + key[2]
        expect = _kappa(want[:, j], layer.u_v, 0).mean(0)  # channel mean over the (t, h, w) window
        np.testing.assert_allclose(kap, expect.numpy(), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("patterns,kv_stride,channel", [("channel", 2, 5), ("head", 2, None), ("shared", 1, None)])
def test_layouts_and_stride(tmp_path, patterns, kv_stride, channel):
    """Head and shared layouts and a key/value stride: the maps lie on the strided key grid,
    kappa is sum_d A[d, j'] u_v[d] (one channel of channel-wise patterns when asked)."""
    from structvit.viz import query_attention

    model = _image_model(patterns=patterns, kv_stride=kv_stride)
    x = viz_cli.load_sample(model, sample="builtin:digits:2", size=(64, 64))
    layer, tokens, grid = _inputs(model, x, 1)
    side = 4 // kv_stride
    qa = query_attention(model, x, block=1, query=(2, 1), head=2, channel=channel)
    assert qa.key_grid3 == (1, side, side) and qa.kv_stride3 == (1, kv_stride, kv_stride)
    w = _op_weights(layer, tokens, grid)[0, 2, 2 * 4 + 1]  # (D, N')
    np.testing.assert_allclose(qa.head_weights(), w.reshape(4, 1, side, side).numpy(), rtol=1e-4, atol=1e-8)
    u_v = {"channel": layer.u_v[2, channel] if channel is not None else None, "head": layer.u_v[2],
           "shared": layer.u_v}[patterns].detach()
    for key in qa.top_keys(3):
        assert qa.key_position(key) == (0, kv_stride * key[1], kv_stride * key[2])
        expect = torch.einsum("d,dhw->hw", w[:, key[1] * side + key[2]], u_v)
        np.testing.assert_allclose(qa.kappa(key)[0], expect.numpy(), rtol=1e-4, atol=1e-8)
    if kv_stride > 1:  # figures on the strided grid; the SA row of the comparison has all N keys
        path = kernels_figure(model, x, tmp_path / "k.png", block=1, query=(2, 1), head=2, channel=channel)
        k = np.load(path.with_suffix(".npz"))
        assert k["attention"].shape == (1, side, side) and np.all(k["top_positions"] == kv_stride * k["top_keys"])
        from structvit.viz import compare_figure

        c = np.load(compare_figure(model, x, tmp_path / "c.png", block=1).with_suffix(".npz"))
        assert c["attention_0"].shape == (1, 4, 4) and c["attention_2"].shape == (1, side, side)
        assert c["kv_strides"].tolist() == [[1, 1, 1], [1, 2, 2], [1, 2, 2]]


def test_sa_row_of_compare_is_plain_softmax(image_case):
    from structvit.viz import derive_variants

    model, x, (_, _, cmp_, _) = image_case
    sa = derive_variants(model)["SA (same q, k)"]
    layer, tokens, grid = _inputs(sa, x, 1)
    with torch.no_grad():
        q, k, _ = layer._qkv(tokens)
    a = torch.softmax(q @ k.transpose(-1, -2) * layer.scale, -1)[0, 1, 6].reshape(1, 4, 4)
    np.testing.assert_allclose(np.load(cmp_.with_suffix(".npz"))["attention"][0], a.numpy(), rtol=1e-4, atol=1e-7)


def test_bad_arguments_name_the_argument(tmp_path):
    model = _image_model(struct_blocks=(1, 0))
    x = torch.randn(3, 64, 64)
    with pytest.raises(ValueError, match=r"query \(4, 0\) is outside the block's token grid \(4, 4\)"):
        attention_figure(model, x, tmp_path / "a.png", block=1, query=(4, 0))
    with pytest.raises(ValueError, match=r"block 0 .* plain self-attention \(SA\).*kernels plot"):
        kernels_figure(model, x, tmp_path / "k.png", block=0)
    with pytest.raises(ValueError, match=r"block must be an attention block index in \[0, 3\)"):
        attention_figure(model, x, tmp_path / "a.png", block=7)
    with pytest.raises(ValueError, match="head must be"):
        attention_figure(model, x, tmp_path / "a.png", block=1, head=9)
    assert not list(tmp_path.iterdir())


def test_cli_errors(tmp_path, capsys):
    rc = viz_cli.main(["kernels", "--model", "structvit_tiny", "--checkpoint", str(tmp_path / "missing.ckpt"),
                       "--out", str(tmp_path)])
    assert rc == 2 and "--checkpoint" in capsys.readouterr().err
    rc = viz_cli.main(["attention", "--model", "structvit_tiny", "--query", "9,9", "--input-size", "64",
                       "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "--query (9, 9) is outside" in err
    rc = viz_cli.main(["kernels", "--model", "structvit_tiny", "--model-kwargs", json.dumps({"struct_blocks": [1, 0]}),
                       "--block", "0", "--input-size", "64", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "--block 0" in err and "StructSA or ConvSA" in err
    rc = viz_cli.main(["attention", "--model", "structvit_tiny", "--sample", "builtin:moving_digits",
                       "--out", str(tmp_path)])
    assert rc == 2 and "--sample" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_checkpoints_load_weights_only(tmp_path):
    from safetensors.torch import save_file

    model = _image_model()
    sd = model.state_dict()
    ckpt = tmp_path / "run.ckpt"  # Lightning layout: prefixed state dict + hyper-parameters
    torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3,
                "hyper_parameters": {"model": "structvit_tiny"}}, ckpt)
    loaded = viz_cli.load_model(None, ckpt)
    assert loaded.head.out_features == 10
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
    st = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st), metadata={"model": "structvit_tiny"})
    assert torch.equal(viz_cli.load_model(None, st).blocks3[1].attn.u_v, model.blocks3[1].attn.u_v)

    import argparse

    bad = tmp_path / "bad.ckpt"  # an arbitrary pickled object next to the weights: refused, not unpickled
    torch.save({"state_dict": sd, "obj": argparse.Namespace(x=1)}, bad)
    with pytest.raises(viz_cli.ArgumentError, match="--checkpoint.*weights[- ]only"):
        viz_cli.load_model("structvit_tiny", bad)
    with pytest.raises(viz_cli.ArgumentError, match="does not fit --model structvit_tiny_video"):
        viz_cli.load_model("structvit_tiny_video", ckpt)


def test_cli_writes_figure_from_checkpoint(tmp_path, capsys):
    model = _image_model()
    ckpt = tmp_path / "m.pt"
    torch.save({"model": model.state_dict()}, ckpt)
    rc = viz_cli.main(["attention", "--model", "structvit_tiny", "--checkpoint", str(ckpt), "--sample",
                       "builtin:digits:1", "--input-size", "64", "--block", "0", "--query", "0,3",
                       "--normalize", "per_pattern", "--out", str(tmp_path / "figs")])
    assert rc == 0, capsys.readouterr().err
    npz = np.load(tmp_path / "figs" / "attention_block0.npz")
    assert tuple(npz["query"]) == (0, 0, 3) and str(npz["normalize"]) == "per_pattern"
    np.testing.assert_allclose(npz["attention"].reshape(4, -1).sum(1), 1.0, rtol=1e-5)
    assert math.isclose(float(npz["attention_all_heads"].sum()), 4 * 4, rel_tol=1e-5)  # heads x D maps of 1
    rc = viz_cli.main(["kernels", "--model", "structvit_tiny", "--checkpoint", str(ckpt), "--input-size", "64",
                       "--block", "1", "--channel", "7", "--top-k", "2", "--out", str(tmp_path / "figs")])
    assert rc == 0, capsys.readouterr().err
    k = np.load(tmp_path / "figs" / "kernels_block1.npz")
    assert int(k["channel"]) == 7
    np.testing.assert_allclose(k["kappa"], k["kappa_channels"][:, 7], rtol=1e-6)
    np.testing.assert_allclose(k["u_v"], k["u_v_channels"][7], rtol=1e-6)
    rc = viz_cli.main(["kernels", "--model", "structvit_tiny", "--input-size", "64", "--channel", "32",
                       "--out", str(tmp_path / "figs")])
    assert rc == 2 and "--channel must be an int in [0, 32)" in capsys.readouterr().err
