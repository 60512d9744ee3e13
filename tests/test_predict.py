"""`structvit predict PATH... --checkpoint CKPT` on files the tests write (videos, frame
folders, rawframes folders, images): the same scores as the evaluation pipeline of the
checkpoint's data module; the dataset-level predict's CSV with ids and class names."""
import csv
import json
import os
import types

import numpy as np
import pytest
import torch
from engine_helpers import TINY_KWARGS, tiny_config

from structvit.cli import main as cli_main
from structvit.data import VideoDataModule, read_annotations
from structvit.data.builtin import DigitsDataset
from structvit.data.fixtures import pattern_frames, write_jpeg_frames, write_ssv2
from structvit.engine.module import ClassificationModule
from structvit.engine.weights import save_weights
from structvit.predict import Predictor, is_file_predict, parse_views, predict

VIDEO_KWARGS = dict(TINY_KWARGS, num_frames=4)


def _export(module, dm, path):
    """What the engine's checkpoint callback writes: the model's weights with export_metadata()."""
    module._trainer = types.SimpleNamespace(datamodule=dm)
    meta = module.export_metadata()
    module._trainer = None
    save_weights(path, module.model.state_dict(), meta)
    return path


@pytest.fixture(scope="module")
def ssv2(tmp_path_factory):
    root = tmp_path_factory.mktemp("ssv2")
    info = write_ssv2(str(root), frames=24, size=(48, 64))
    torch.manual_seed(0)
    dm = VideoDataModule("ssv2", root=str(root), num_frames=4, input_size=32, num_clips=2, num_crops=3,
                         batch_size=2)
    module = ClassificationModule("structvit_tiny_video", model_kwargs=VIDEO_KWARGS, num_classes=3).eval()
    ckpt = _export(module, dm, str(root / "model.safetensors"))
    return types.SimpleNamespace(root=root, info=info, dm=dm, module=module, ckpt=ckpt)


def test_video_files_scored_as_at_evaluation(ssv2):
    dm, module = ssv2.dm, ssv2.module
    dm.setup("test")
    ds = dm._datasets["test"]
    x = torch.stack([ds[i][0] for i in range(len(ds))])  # (B, V, C, T, H, W): the test pipeline's views
    assert x.shape[1:3] == (6, 3)
    with torch.no_grad():
        want = module._views_forward(module.model, x).exp()
    paths = [r.path for r in ds.records]
    rows = predict(paths, ssv2.ckpt, topk=3)
    classes = ssv2.info["classes"]
    for row, p in zip(rows, want):
        assert row["error"] is None and row["kind"] == "video" and row["views"] == 6
        got = torch.zeros(3)
        for t in row["topk"]:
            got[t["index"]] = t["prob"]
            assert t["name"] == classes[t["index"]]
        torch.testing.assert_close(got, p, atol=1e-5, rtol=1e-4)
        assert [t["prob"] for t in row["topk"]] == sorted((t["prob"] for t in row["topk"]), reverse=True)
    # other views on request: one clip, one crop
    one = predict(paths[:1], ssv2.ckpt, views="1x1")[0]
    assert one["views"] == 1


def test_rawframes_folder_reads_rgb_only(ssv2, tmp_path):
    frames = pattern_frames(12, 48, 64, seed=3)
    plain, raw = tmp_path / "plain", tmp_path / "raw"
    write_jpeg_frames(plain, frames, template="img_{:05d}.jpg")
    write_jpeg_frames(raw, frames, template="img_{:05d}.jpg")
    flow = np.full_like(frames, 128)  # flow images are grey: mixing them in changes the clip
    write_jpeg_frames(raw, flow, template="flow_x_{:05d}.jpg")
    write_jpeg_frames(raw, flow, template="flow_y_{:05d}.jpg")
    a, b = predict([str(plain), str(raw)], ssv2.ckpt, topk=3)
    assert a["kind"] == b["kind"] == "frames" and a["error"] is None
    assert [t["index"] for t in a["topk"]] == [t["index"] for t in b["topk"]]
    assert [t["prob"] for t in a["topk"]] == pytest.approx([t["prob"] for t in b["topk"]], abs=1e-6)


def test_cli_table_json_csv_and_errors(ssv2, tmp_path, capsys):
    vid = str(next((ssv2.root / "20bn-something-something-v2").glob("*.webm")))
    assert cli_main(["predict", vid, "--checkpoint", ssv2.ckpt, "--topk", "2"]) == 0
    out = capsys.readouterr().out
    assert vid in out and "\n  1. " in out and "\n  2. " in out and "\n  3. " not in out
    assert cli_main(["predict", vid, "--checkpoint", ssv2.ckpt, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["path"] == vid and len(rows[0]["topk"]) == 3
    out_csv = tmp_path / "p.csv"
    assert cli_main(["predict", vid, "--checkpoint", ssv2.ckpt, "--format", "csv", "--output", str(out_csv)]) == 0
    got = list(csv.DictReader(open(out_csv)))
    assert got[0]["pred_name"] == rows[0]["topk"][0]["name"] and got[0]["path"] == vid
    # a missing file, an image for a video model: reported per file, exit status 1
    img = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    assert cli_main(["predict", vid, str(tmp_path / "nope.mp4"), str(img), "--checkpoint", ssv2.ckpt]) == 1
    out = capsys.readouterr().out
    assert "nope.mp4: no such file" in out and "is an image but" in out
    assert cli_main(["predict", vid, "--checkpoint", str(tmp_path / "none.ckpt")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli_main(["predict", vid, "--checkpoint", ssv2.ckpt, "--views", "x3"]) == 2


def test_unreadable_video_is_an_error_not_a_neighbour(ssv2, tmp_path):
    bad = tmp_path / "bad.webm"
    bad.write_bytes(os.urandom(2000))
    good = str(next((ssv2.root / "20bn-something-something-v2").glob("*.webm")))
    rows = predict([str(bad), good], ssv2.ckpt)
    assert rows[0]["topk"] == [] and "bad.webm" in rows[0]["error"] and rows[1]["error"] is None


def test_checkpoint_without_preprocessing_is_refused(tmp_path):
    m = ClassificationModule("structvit_tiny", model_kwargs=TINY_KWARGS, num_classes=10)
    path = str(tmp_path / "w.safetensors")
    save_weights(path, m.model.state_dict(), {"model": "structvit_tiny", "num_classes": "10"})
    with pytest.raises(ValueError, match="no preprocessing metadata"):
        Predictor(path)


def test_argument_forms():
    assert is_file_predict(["a.mp4", "--checkpoint", "c"]) and is_file_predict(["--checkpoint=c", "a.mp4"])
    assert not is_file_predict(["--config", "x.yaml", "--ckpt_path", "last"]) and not is_file_predict([])
    assert parse_views("4x3") == (4, 3) and parse_views("2") == (2, 1)
    with pytest.raises(ValueError, match="CLIPSxCROPS"):
        parse_views("ax3")


def _lightning_cli_warnings(recwarn):
    return [str(w.message) for w in recwarn.list if "args parameter is intended" in str(w.message)]


def test_fit_then_predict_images_and_the_split(tmp_path, recwarn):
    """A real run: its .ckpt and .safetensors both predict a PNG as the module scores the
    digit; the dataset-level predict writes ids and class names; no Lightning warnings
    about our own use of LightningCLI."""
    cfg = tiny_config(tmp_path / "cfg.yaml", root_dir=tmp_path / "run", max_steps=2, every=2)
    assert cli_main(["fit", "--config", cfg]) == 0
    assert _lightning_cli_warnings(recwarn) == []
    ckpt_dir = tmp_path / "run" / "checkpoints"
    ds = DigitsDataset("val")
    from PIL import Image

    pngs = []
    for i in range(3):
        p = tmp_path / f"digit{i}.png"
        Image.fromarray(ds.images[i].permute(1, 2, 0).numpy()).save(p)
        pngs.append(str(p))
    module = ClassificationModule.load_from_checkpoint(str(ckpt_dir / "last.ckpt"), map_location="cpu",
                                                       weights_only=True).eval()
    with torch.no_grad():
        want = module.model(torch.stack([ds[i][0] for i in range(3)])).softmax(-1)
    for ckpt in (ckpt_dir / "last.ckpt", ckpt_dir / "last.safetensors"):
        rows = predict(pngs, str(ckpt), topk=10)
        for row, p in zip(rows, want):
            assert row["kind"] == "image" and row["error"] is None
            got = torch.zeros(10)
            for t in row["topk"]:
                got[t["index"]] = t["prob"]
                assert t["name"] == str(t["index"])  # the digits' class names
            torch.testing.assert_close(got, p, atol=1e-5, rtol=1e-4)
    # a frame folder for an image model: an error naming it
    folder = tmp_path / "frames"
    write_jpeg_frames(folder, pattern_frames(2, 32, 32))
    assert "is an image model" in predict([str(folder)], str(ckpt_dir / "last.ckpt"))[0]["error"]
    # the dataset-level predict (LightningCLI): file ids and class names in predictions.csv
    assert cli_main(["predict", "--config", cfg, "--ckpt_path", "last"]) == 0
    assert _lightning_cli_warnings(recwarn) == []
    csv_path = next((tmp_path / "run" / "logs").glob("version_*/predictions.csv"))
    rows = list(csv.DictReader(open(csv_path)))
    assert rows and set(rows[0]) >= {"index", "id", "pred", "pred_name", "topk_names", "target", "target_name"}
    for r in rows:
        assert r["pred_name"] == r["pred"] and r["target_name"] == r["target"]
        assert r["id"] != ""


def test_ssv2_test_split_predicts_without_labels(ssv2, tmp_path):
    """SSv2's test.json has ids only: the split reads as unlabelled, its loader carries ids."""
    import shutil

    root = tmp_path / "ssv2"
    shutil.copytree(ssv2.root, root)
    val = json.loads((root / "labels" / "something-something-v2-validation.json").read_text())
    (root / "labels" / "something-something-v2-test.json").write_text(json.dumps([{"id": e["id"]} for e in val]))
    ann = read_annotations("ssv2", root, "test")
    assert [r.label for r in ann.records] == [-1, -1] and not ann.labelled and ann.problems == []
    dm = VideoDataModule("ssv2", root=str(root), test_split="test", num_frames=4, input_size=32, batch_size=2)
    x, y, idx, skipped = next(iter(dm.predict_dataloader()))
    assert y.tolist() == [-1, -1] and idx.tolist() == [0, 1] and int(skipped) == 0
    assert dm.sample_ids("test") == [e["id"] for e in val]


def test_viz_inputs_are_prepared_at_the_checkpoint_size(ssv2):
    """viz's model and sample loading (the figures' route) takes the checkpoint's evaluation
    size, frames and normalisation, not the model's default 112 px / 16 frames."""
    from structvit.viz.cli import load_model, load_sample

    model = load_model(checkpoint=ssv2.ckpt)
    assert model.eval_preprocessing["input_size"] == 32
    dm = ssv2.dm
    dm.setup("test")
    path = dm._datasets["test"].records[0].path
    x = load_sample(model, input_path=path)
    assert x.shape == (3, 4, 32, 32)  # the model's own default would be (3, 16, 112, 112)
