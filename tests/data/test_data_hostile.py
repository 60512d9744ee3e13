"""Hostile and unusual data: sample ids and links that leave the dataset root, annotation
files that do not parse, videos whose frame size changes mid-stream, images of every PIL
mode.  Each dataset is written in its real layout (tiny files)."""
import json
import os
import shutil

import numpy as np
import pytest

from structvit.data import FrameSampler, ImageFolderDataset, VideoDataset, read_annotations
from structvit.data.check import main as data_main
from structvit.data.files import CorruptFileError, UnsupportedImageError
from structvit.data.fixtures import (
    FIXTURE_WRITERS,
    decode_frame_index,
    pattern_frames,
    write_jpeg_frames,
    write_resizing_video,
)
from structvit.data.images import load_image
from structvit.data.scan import check_dataset
from structvit.data.video import read_frame_folder, read_video_all, read_video_frames, write_video

SMALL = dict(size=(24, 32))


def _raw(frames):
    return frames.permute(3, 0, 1, 2)


@pytest.fixture(scope="module")
def small_layouts(tmp_path_factory):
    out = {}
    for name, writer in FIXTURE_WRITERS.items():
        root = tmp_path_factory.mktemp(name)
        out[name] = (root, writer(str(root), frames=8, **SMALL))
    return out


@pytest.fixture
def outside(tmp_path):
    """A video (.webm, .mp4), a frame folder and an image outside every dataset root."""
    d = tmp_path / "outside"
    frames = pattern_frames(8, 24, 32)
    write_video(d / "secret.webm", frames, fps=8)
    write_video(d / "secret.mp4", frames, fps=8)
    write_jpeg_frames(d / "secret", frames[:4])
    return d


def _copy(small_layouts, name, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(small_layouts[name][0], root)
    return root


def _inside(path, root) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(root) + os.sep)


def _assert_refused(name, root, split, hostile, reader_options=None):
    """No record leaves the root; each hostile id is reported by the reader and by data check."""
    ann = read_annotations(name, root, split, **(reader_options or {}))
    assert all(_inside(r.path, root) for r in ann.records), [r.path for r in ann.records]
    for h in hostile:
        assert any(h in p and "outside the dataset root" in p for p in ann.problems), (h, ann.problems)
    problems = check_dataset(name, root, (split,), num_classes=len(ann.classes), reader_options=reader_options)
    for h in hostile:
        assert any(h in p and "outside the dataset root" in p for p in problems), (h, problems)
    return ann


# ----------------------------------------------------------------------------- ids that leave the root
def test_ssv2_ids_leaving_the_root_are_refused(small_layouts, tmp_path, outside):
    root = _copy(small_layouts, "ssv2", tmp_path)
    path = root / "labels" / "something-something-v2-train.json"
    entries = json.loads(path.read_text())
    hostile = ["../../outside/secret", str(outside / "secret")]
    entries += [dict(entries[0], id=h) for h in hostile]
    path.write_text(json.dumps(entries))
    ann = _assert_refused("ssv2", root, "train", hostile)
    assert len(ann.records) == 3
    for check_files in (True, False):  # the unchecked path is refused too
        ann = read_annotations("ssv2", root, "train", check_files=check_files)
        assert all(_inside(r.path, root) for r in ann.records)


def test_ssv1_ids_leaving_the_root_are_refused(small_layouts, tmp_path, outside):
    root = _copy(small_layouts, "ssv1", tmp_path)
    label = small_layouts["ssv1"][1]["classes"][0]
    hostile = ["../../outside/secret", str(outside / "secret")]
    with open(root / "something-something-v1-train.csv", "a") as f:
        f.writelines(f"{h};{label}\n" for h in hostile)
    ann = _assert_refused("ssv1", root, "train", hostile)
    assert len(ann.records) == 3


def test_diving48_and_finegym_ids_leaving_the_root_are_refused(small_layouts, tmp_path, outside):
    root = _copy(small_layouts, "diving48", tmp_path)
    path = root / "Diving48_V2_train.json"
    entries = json.loads(path.read_text())
    hostile = ["../../outside/secret", str(outside / "secret")]
    path.write_text(json.dumps(entries + [dict(entries[0], vid_name=h) for h in hostile]))
    assert len(_assert_refused("diving48", root, "train", hostile).records) == 2

    root = tmp_path / "gym"
    shutil.copytree(small_layouts["gym99"][0], root)
    with open(root / "gym99_train_element_v1.1.txt", "a") as f:
        f.writelines(f"{h} 3\n" for h in hostile)
    assert len(_assert_refused("gym99", root, "train", hostile).records) == 2


def test_path_list_and_kinetics_links_leaving_the_root_are_refused(small_layouts, tmp_path, outside):
    root = _copy(small_layouts, "kinetics400", tmp_path)
    good = sorted((root / "train").rglob("*.mp4"))
    rel = os.path.relpath(good[0], root)
    hostile = ["../outside/secret.mp4", str(outside / "secret.mp4")]
    (root / "list.txt").write_text(f"{rel} 0\n" + "".join(f"{h} 1\n" for h in hostile))
    opts = {"annotation_file": str(root / "list.txt")}
    ann = _assert_refused("kinetics400", root, "train", hostile, opts)
    assert [r.name for r in ann.records] == [rel]
    # a clip of the CSV that is a link to a file outside the root
    good[1].unlink()
    good[1].symlink_to(outside / "secret.mp4")
    ann = _assert_refused("kinetics400", root, "train", [good[1].stem])
    assert len(ann.records) == 3


def test_frame_links_leaving_the_root_are_refused_when_read_and_loaded(small_layouts, tmp_path, outside):
    root = _copy(small_layouts, "ssv1", tmp_path)
    fdir = root / "20bn-something-something-v1"
    # a frame folder that is a link to a folder outside
    shutil.rmtree(fdir / "12")
    (fdir / "12").symlink_to(outside / "secret", target_is_directory=True)
    ann = _assert_refused("ssv1", root, "train", ["12"])
    assert [r.name for r in ann.records] == ["11", "13"]
    # a frame inside a folder that links outside, made after indexing: named when loaded,
    # replaced in training, skipped in evaluation
    frame = fdir / "11" / "00002.jpg"
    frame.unlink()
    frame.symlink_to(outside / "secret" / "00002.jpg")
    sampler = FrameSampler("dense", num_frames=8, frame_stride=1)
    train = VideoDataset(ann, sampler=sampler, transform=_raw, train=True)
    _, label = train[0]
    assert label == ann.records[1].label and "11" in train.bad_files[0]
    ev = VideoDataset(ann, sampler=sampler, transform=_raw, train=False)
    assert ev[0] is None and ev.num_bad_samples == 1
    problems = check_dataset("ssv1", root, ("train",), num_classes=3)
    assert any("00002.jpg" in p and "outside the dataset root" in p for p in problems), problems


def test_image_links_leaving_the_root_are_refused(tmp_path, outside):
    from PIL import Image

    root = tmp_path / "imgs"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8), (10, 20, 30)).save(root / split / c / "0.png")
    Image.new("RGB", (8, 8)).save(outside / "secret.png")
    (root / "train" / "a" / "1.png").symlink_to(outside / "secret.png")
    (root / "train" / "b" / "sub").symlink_to(outside, target_is_directory=True)
    ds = ImageFolderDataset(root, "train")
    assert all(_inside(p, root) for p, _ in ds.samples) and len(ds.samples) == 2
    assert any("1.png" in p and "outside the dataset root" in p for p in ds.problems)
    problems = check_dataset("imagefolder", root, ("train", "val"))
    assert any("1.png" in p and "outside the dataset root" in p for p in problems)


# ----------------------------------------------------------------------------- annotation parse errors
def test_malformed_json_is_reported_with_file_line_and_column(small_layouts, tmp_path, capsys):
    root = _copy(small_layouts, "ssv2", tmp_path)
    path = root / "labels" / "something-something-v2-train.json"
    path.write_text('[\n  {"id": "101",\n   "template": "Moving [something] from left')
    with pytest.raises(ValueError) as err:
        read_annotations("ssv2", root, "train")
    msg = str(err.value)
    assert str(path) in msg and "line 3 column 16" in msg and "\n" not in msg
    assert data_main(["check", "--dataset", "ssv2", "--root", str(root), "--split", "train", "val",
                      "--num-classes", "3"]) == 1
    out = capsys.readouterr().out
    assert any(str(path) in ln and "line 3 column 16" in ln for ln in out.splitlines()), out
    # a labels file of the wrong JSON type is named too
    (root / "labels" / "something-something-v2-labels.json").write_text('["a", "b"]')
    with pytest.raises(ValueError, match="something-something-v2-labels.json.*JSON object"):
        read_annotations("ssv2", root, "val")


def test_undecodable_text_and_csv_are_reported_with_file_line_and_column(small_layouts, tmp_path):
    root = tmp_path / "gym"
    shutil.copytree(small_layouts["gym99"][0], root)
    path = root / "gym99_train_element_v1.1.txt"
    path.write_bytes(path.read_bytes() + b"abc\xff 3\n")
    with pytest.raises(ValueError) as err:
        read_annotations("gym99", root, "train")
    assert str(path) in str(err.value) and "line 3 column 4" in str(err.value)
    root = _copy(small_layouts, "kinetics400", tmp_path)
    csv_path = root / "annotations" / "train.csv"
    csv_path.write_text(csv_path.read_text() + 'zumba,"unterminated,1,2,train\n')
    problems = check_dataset("kinetics400", root, ("train",), num_classes=3)
    assert any(str(csv_path) in p and "line 6" in p for p in problems), problems
    diving = _copy(small_layouts, "diving48", tmp_path / "d")
    (diving / "Diving48_V2_train.json").write_text('[{"vid_name": "x", "label": 1},\n {"vid_name": }]')
    with pytest.raises(ValueError, match=r"Diving48_V2_train.json line 2 column 15"):
        read_annotations("diving48", diving, "train")


# ----------------------------------------------------------------------------- frame size changing mid-stream
def _resizing(path, first=0):
    write_resizing_video(path, [pattern_frames(6, 48, 64, first=first), pattern_frames(6, 24, 32, first=first + 6)],
                         codec="libvpx-vp9" if str(path).endswith(".webm") else "libx264")


def test_video_whose_frame_size_changes_is_scaled_to_the_first_frames_size(tmp_path):
    path = tmp_path / "resizing.mp4"
    _resizing(path)
    every = read_video_all(path)
    assert every.shape == (12, 48, 64, 3) and decode_frame_index(every) == list(range(12))
    some = read_video_frames(path, [9, 2, 5, 11, 6])
    assert some.shape == (5, 48, 64, 3) and decode_frame_index(some) == [9, 2, 5, 11, 6]
    folder = tmp_path / "frames"  # the same in a frame folder of mixed sizes
    write_jpeg_frames(folder, pattern_frames(3, 48, 64))
    write_jpeg_frames(folder, pattern_frames(3, 24, 32, first=3), start=4)
    got = read_frame_folder(folder, [4, 0, 5])
    assert got.shape == (3, 48, 64, 3) and decode_frame_index(got) == [4, 0, 5]


def test_check_and_fit_go_on_past_a_resizing_video(small_layouts, tmp_path, monkeypatch):
    import lightning as L

    from structvit.data import VideoDataModule
    from structvit.engine import ClassificationModule

    root = _copy(small_layouts, "ssv2", tmp_path)
    vdir = root / "20bn-something-something-v2"
    _resizing(vdir / "101.webm")
    for quick in (False, True):
        assert check_dataset("ssv2", root, ("train",), quick=quick, num_classes=3) == []
    # one sample failing in an unexpected way is named, and the scan goes on
    from structvit.data import video

    real = video.count_decodable_frames

    def fail_on_102(path):
        if str(path).endswith("102.webm"):
            raise OverflowError("decoder exploded")
        return real(path)

    monkeypatch.setattr(video, "count_decodable_frames", fail_on_102)
    problems = check_dataset("ssv2", root, ("train",), num_classes=3)
    assert len(problems) == 1 and "102.webm" in problems[0] and "decoder exploded" in problems[0]
    monkeypatch.undo()
    # two training steps and a validation pass over a dataset holding it
    dm = VideoDataModule("ssv2", root=str(root), num_frames=4, input_size=32, batch_size=3, drop_last=False)
    model = ClassificationModule("structvit_tiny_video", {"depths": [1, 1, 1, 1], "embed_dims": [16, 32, 64, 128],
                                                          "head_dim": 16, "num_patterns": 2, "num_frames": 4},
                                 num_classes=3, warmup_steps=1)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, limit_val_batches=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    trainer.fit(model, dm)
    assert trainer.global_step == 2 and dm.num_bad_samples == 0


# ----------------------------------------------------------------------------- image modes
def test_sixteen_bit_png_keeps_its_range(tmp_path):
    from PIL import Image

    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # PIL opens it as a 16/32-bit integer image
    rgb = np.asarray(load_image(path))
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()
    np.testing.assert_array_equal(rgb[..., 0], np.rint(ramp / 257.0).astype(np.uint8))
    assert (rgb == 255).mean() < 0.01 and len(np.unique(rgb)) == 256
    # the same through an image folder (training) and data check
    for split in ("train", "val"):
        (tmp_path / "ds" / split / "a").mkdir(parents=True)
        shutil.copy(path, tmp_path / "ds" / split / "a" / "deep.png")
    img, _ = ImageFolderDataset(tmp_path / "ds", "train")[0]
    np.testing.assert_array_equal(np.asarray(img), rgb)
    assert check_dataset("imagefolder", tmp_path / "ds", ("train", "val")) == []


@pytest.mark.parametrize("mode", ["1", "L", "P", "LA", "RGBA", "CMYK", "I", "F", "I;16"])
def test_every_pil_mode_loads_as_rgb_with_its_range(tmp_path, mode):
    from PIL import Image

    gray = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (8, 1))  # (8, 64) ramp 0..252
    base = Image.fromarray(gray, mode="L")
    if mode == "I":
        im = Image.fromarray(gray.astype(np.int32) * 257, mode="I")
    elif mode == "I;16":
        im = Image.fromarray(gray.astype(np.uint16) * 257)
    elif mode == "F":
        im = Image.fromarray(gray.astype(np.float32) / 255.0, mode="F")
    elif mode == "1":
        im = base.convert("1", dither=Image.Dither.NONE)
    else:
        im = base.convert(mode)
    path = tmp_path / ("im.tiff" if mode in ("I", "F", "CMYK") else "im.png")
    im.save(path)
    rgb = np.asarray(load_image(path))
    assert rgb.shape == (8, 64, 3) and rgb.dtype == np.uint8
    if mode == "1":
        np.testing.assert_array_equal(rgb[..., 0], np.where(gray >= 128, 255, 0))
    else:
        np.testing.assert_allclose(rgb[..., 0].astype(int), gray.astype(int), atol=1)


def test_unmappable_images_are_reported_by_name(tmp_path):
    from PIL import Image

    path = tmp_path / "hdr.tiff"
    Image.fromarray(np.full((4, 4), 1000.0, np.float32), mode="F").save(path)
    with pytest.raises(UnsupportedImageError, match="hdr.tiff.*0..1 or 0..255"):
        load_image(path)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(CorruptFileError, match="bad.png"):
        load_image(tmp_path / "bad.png")


# ----------------------------------------------------------------------------- the data check registry
def test_a_dataset_plugs_into_data_check_with_one_entry(tmp_path, monkeypatch, capsys):
    from structvit.data import scan

    seen = {}

    def check_toy(root, splits=("a", "b")):  # takes only what it needs
        seen.update(root=root, splits=splits)
        return [f"{root}/x.json line 1 column 2: broken"]

    monkeypatch.setitem(scan.DATASET_CHECKS, "toy", check_toy)
    assert data_main(["check", "--dataset", "toy", "--root", str(tmp_path), "--quick"]) == 1
    assert seen == {"root": str(tmp_path), "splits": ("a", "b")}
    assert "PROBLEM " + f"{tmp_path}/x.json line 1 column 2: broken" in capsys.readouterr().out
    monkeypatch.setitem(scan.DATASET_CHECKS, "toy", "structvit.data.no_such_module:check")
    assert data_main(["check", "--dataset", "toy", "--root", str(tmp_path)]) == 2
    assert "no_such_module" in capsys.readouterr().err


def test_a_media_folder_linked_to_another_disk_still_reads(small_layouts, tmp_path):
    root = _copy(small_layouts, "ssv2", tmp_path)
    elsewhere = tmp_path / "big_disk" / "videos"
    shutil.move(root / "20bn-something-something-v2", elsewhere)
    (root / "20bn-something-something-v2").symlink_to(elsewhere, target_is_directory=True)
    ann = read_annotations("ssv2", root, "train")
    assert ann.problems == [] and len(ann.records) == 3
    ds = VideoDataset(ann, sampler=FrameSampler("segment", num_frames=4), transform=_raw, train=False)
    assert all(ds[i] is not None for i in range(len(ds))) and ds.num_bad_samples == 0


def test_a_decoder_failing_its_own_way_is_a_named_bad_sample(small_layouts, tmp_path, monkeypatch):
    from structvit.data import video_dataset

    ann = read_annotations("gym99", small_layouts["gym99"][0], "train")
    real = video_dataset.read_video_frames

    def fail_on_first(path, indices):
        if path == ann.records[0].path:
            raise OverflowError("decoder exploded")
        return real(path, indices)

    monkeypatch.setattr(video_dataset, "read_video_frames", fail_on_first)
    sampler = FrameSampler("dense", num_frames=2)
    train = VideoDataset(ann, sampler=sampler, transform=_raw, train=True)
    assert train[0][1] == ann.records[1].label and train.bad_files == [ann.records[0].path]
    ev = VideoDataset(ann, sampler=sampler, transform=_raw, train=False)
    assert ev[0] is None and ev[1] is not None and ev.bad_files == [ann.records[0].path]
