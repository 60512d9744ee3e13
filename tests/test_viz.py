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
    with torch.no_grad():
        q, k, v = layer._qkv(tokens)
        u_k, u_v = layer.patterns_for(len(grid))
        _, w = struct_attention(q, k, v, u_k, u_v, grid, normalize=normalize or layer.normalize, backend="naive",
                            scale=layer.scale, return_weights=True)
    return w, u_v


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
    assert a["attention"].shape == (8, 1, 4, 4)  # D, T, H, W for a 64x64 input (stage 3: 4x4 tokens)
    assert a["attention_all_heads"].shape == (4, 8, 1, 4, 4)
    assert a["u_v"].shape == a["u_k"].shape == (8, 1, 3, 3)
    assert a["kappa"].shape == (4, 1, 3, 3) and a["top_keys"].shape == (4, 3)
    assert tuple(a["query"]) == (0, 1, 2) and tuple(a["grid"]) == (1, 4, 4) and int(a["head"]) == 1
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
    assert grid == (4, 4)
    w, u_v = _op_weights(layer, tokens, grid)
    qi = 1 * 4 + 2
    want = w[0, 1, qi].reshape(8, 1, 4, 4).numpy()  # head 1, query (1, 2)
    a = np.load(att.with_suffix(".npz"))
    np.testing.assert_allclose(a["attention"], want, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(a["shares"], want.reshape(8, -1).sum(1), rtol=1e-4)
    assert layer.normalize == "joint" and abs(a["shares"].sum() - 1) < 1e-5  # one distribution over (d, j)
    for key, kap in zip(a["top_keys"], a["kappa"]):
        j = key[1] * 4 + key[2]
        expect = torch.einsum("d,dhw->hw", w[0, 1, qi, :, j], u_v[1].detach()).numpy()
        np.testing.assert_allclose(kap[0], expect, rtol=1e-4, atol=1e-8)
    mass = want.sum(0).reshape(-1)
    assert mass[a["top_keys"][0][1] * 4 + a["top_keys"][0][2]] == pytest.approx(mass.max(), rel=1e-5)
    r = np.load(rd.with_suffix(".npz"))
    wp, _ = _op_weights(layer, tokens, grid, normalize="per_pattern")
    np.testing.assert_allclose(r["joint"], want, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(r["per_pattern"], wp[0, 1, qi].reshape(8, 1, 4, 4).numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(r["per_pattern"].reshape(8, -1).sum(1), 1.0, rtol=1e-5)  # each map sums to 1
    c = np.load(cmp_.with_suffix(".npz"))
    np.testing.assert_allclose(c["attention"][2], want.sum(0), rtol=1e-4, atol=1e-7)  # StructSA row: sum over d


def test_video_figure_numbers_are_the_ops_attention(video_case):
    model, x, (att, ker, cmp_, rd) = video_case
    layer, tokens, grid = _inputs(model, x, 0)
    assert grid == (2, 4, 4)
    w, u_v = _op_weights(layer, tokens, grid)
    qi = (1 * 4 + 2) * 4 + 1
    want = w[0, 0, qi]  # (D, N), head 0
    k = np.load(ker.with_suffix(".npz"))
    np.testing.assert_allclose(k["attention_patterns"], want.reshape(8, 2, 4, 4).numpy(), rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(k["attention"], want.sum(0).reshape(2, 4, 4).numpy(), rtol=1e-4, atol=1e-8)
    for key, kap in zip(k["top_keys"], k["kappa"]):
        j = (key[0] * 4 + key[1]) * 4 + key[2]
        expect = torch.einsum("d,dthw->thw", want[:, j], u_v[0].detach()).numpy()
        np.testing.assert_allclose(kap, expect, rtol=1e-4, atol=1e-9)


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
    with pytest.raises(viz_cli.ArgumentError, match="--checkpoint .* weights-only"):
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
    np.testing.assert_allclose(npz["attention"].reshape(8, -1).sum(1), 1.0, rtol=1e-5)
    assert math.isclose(float(npz["attention_all_heads"].sum()), 4 * 8, rel_tol=1e-5)
