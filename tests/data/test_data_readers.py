"""The six benchmark readers on tiny datasets written in the official layouts (real videos,
JPEG frames and annotation files), bad-data handling, `structvit data` check / export."""
import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch

from structvit.data import (
    FrameSampler,
    ImageFolderDataset,
    VideoDataModule,
    VideoDataset,
    moving_digits_dataset,
    read_annotations,
    read_path_label_list,
    ssv2_template_to_label,
)
from structvit.data.builtin import DigitsDataset
from structvit.data.check import main as data_main
from structvit.data.fixtures import FIXTURE_WRITERS, decode_frame_index, write_diving48

NAMES = list(FIXTURE_WRITERS)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    out = {}
    for name, writer in FIXTURE_WRITERS.items():
        root = tmp_path_factory.mktemp(name)
        out[name] = (str(root), writer(str(root)))
    return out


def _raw(frames):  # keep the decoded pixels: (T, H, W, 3) uint8 -> (C, T, H, W)
    return frames.permute(3, 0, 1, 2)


def _frames_of(clip):  # inverse of _raw for decode_frame_index
    return clip.permute(1, 2, 3, 0)


@pytest.mark.parametrize("name", NAMES)
def test_reader_labels_classes_and_files(layouts, name):
    root, info = layouts[name]
    for split in ("train", "val"):
        ann = read_annotations(name, root, split)
        assert ann.problems == []
        assert [(r.name, r.label) for r in ann.records] == [(e[0], e[1]) for e in info["expected"][split]]
        assert ann.classes == info["classes"]
        for r in ann.records:
            assert os.path.exists(r.path)
            assert r.frames == (name == "ssv1")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", ["dense", "segment"])
def test_sampled_frames_are_the_decoded_frames(layouts, name, mode):
    root, info = layouts[name]
    ann = read_annotations(name, root, "train")
    for train in (True, False):
        sampler = FrameSampler(mode, num_frames=4, frame_stride=2, num_clips=3)
        ds = VideoDataset(ann, sampler=sampler, transform=_raw, train=train)
        for i in range(len(ds)):
            clip, label = ds[i]
            assert label == ann.records[i].label
            views = clip.unsqueeze(0) if train else clip
            assert views.shape[:3] == ((1 if train else 3), 3, 4)
            idx = ds.last_indices
            for v in range(views.shape[0]):
                assert decode_frame_index(_frames_of(views[v])) == idx[v].tolist()
            rec = ann.records[i]
            lo = rec.start_frame
            hi = rec.end_frame if rec.end_frame is not None else info["expected"]["train"][i][2]
            assert lo <= idx.min() and idx.max() < hi
            if mode == "dense":
                assert (np.diff(idx, axis=1) == 2).all()


@pytest.mark.parametrize("name", ["ssv2", "kinetics400"])
def test_multiview_test_samples_and_shapes(layouts, name):
    root, _ = layouts[name]
    dm = VideoDataModule(name, root=root, num_frames=4, input_size=32, num_clips=2, num_crops=3, batch_size=2)
    assert dm.hparams.flip is (name == "kinetics400")
    assert dm.hparams.sampling == ("segment" if name == "ssv2" else "dense")
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 4, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    dm.setup("test")
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (2, 6, 3, 4, 32, 32)
    assert dm.num_classes == 3


def test_ssv2_template_brackets_removed():
    assert ssv2_template_to_label("Putting [something] on [something]") == "Putting something on something"


def test_kinetics_classes_come_from_the_csv_not_folders(layouts, tmp_path):
    root, info = layouts["kinetics400"]
    ann = read_annotations("kinetics400", root, "val")
    assert ann.classes == ["abseiling", "air drumming", "zumba"]
    # "path label" list files
    lst = tmp_path / "val_list.txt"
    rel = [os.path.relpath(r.path, root) for r in ann.records]
    lst.write_text("".join(f"{p} {r.label}\n" for p, r in zip(rel, ann.records)) + "missing/clip.mp4 1\nbad line\n")
    got = read_path_label_list(lst, root, num_classes=3)
    assert [r.label for r in got.records] == [r.label for r in ann.records]
    assert any("missing/clip.mp4" in p for p in got.problems) and any("line 4" in p for p in got.problems)


def test_diving48_frame_folders_and_frame_range(tmp_path):
    info = write_diving48(str(tmp_path), as_frames=True)
    ann = read_annotations("diving48", str(tmp_path), "train")
    assert all(r.frames for r in ann.records) and ann.records[1].start_frame == 4
    ds = VideoDataset(ann, sampler=FrameSampler("segment", num_frames=6), transform=_raw, train=False)
    clip, label = ds[1]
    assert label == 47
    got = decode_frame_index(_frames_of(clip))
    assert got == ds.last_indices[0].tolist() and min(got) >= 4 and max(got) < info["expected"]["train"][1][4]


def test_unknown_labels_and_missing_files_reported_up_front(layouts, tmp_path, caplog):
    src, _ = layouts["ssv2"]
    root = tmp_path / "ssv2"
    shutil.copytree(src, root)
    ann_path = root / "labels" / "something-something-v2-train.json"
    entries = json.loads(ann_path.read_text())
    entries.append({"id": "999", "template": "Juggling [something]", "label": "x", "placeholders": ["x"]})
    entries.append({"id": "998", "template": entries[0]["template"], "label": "x", "placeholders": ["x"]})
    ann_path.write_text(json.dumps(entries))
    ann = read_annotations("ssv2", root, "train")
    assert len(ann.records) == 3
    assert any("unknown label 'Juggling something'" in p and "entry 3" in p for p in ann.problems)
    assert any("998.webm" in p and "missing file" in p for p in ann.problems)
    with caplog.at_level(logging.WARNING, logger="structvit.data"):
        ds = VideoDataset(ann, sampler=FrameSampler("segment", num_frames=4), transform=_raw, train=True)
    assert len(ds) == 3 and "Juggling" in caplog.text
    with pytest.raises(ValueError, match="998.webm"):
        VideoDataset(ann, sampler=FrameSampler(), transform=_raw, train=True, on_problem="raise")
    # the same through the check command: non-zero exit, every problem listed
    assert data_main(["check", "--dataset", "ssv2", "--root", str(root), "--split", "train"]) == 1


def _with_bad_files(src, dst):
    shutil.copytree(src, dst)
    vids = sorted((dst / "20bn-something-something-v2").glob("*.webm"))
    vids[0].write_bytes(os.urandom(3000))  # garbage bytes
    data = vids[1].read_bytes()
    vids[1].write_bytes(data[: len(data) // 3])  # truncated
    return vids[0], vids[1]


def test_corrupt_and_truncated_files_are_reported_counted_and_replaced(layouts, tmp_path, caplog):
    garbage, cut = _with_bad_files(layouts["ssv2"][0], tmp_path / "ssv2")
    ann = read_annotations("ssv2", tmp_path / "ssv2", "train")
    assert ann.problems == []  # the files exist: found when read
    # evaluation: the bad samples are skipped (None), never replaced by a neighbour
    ds = VideoDataset(ann, sampler=FrameSampler("segment", num_frames=8), transform=_raw, train=False)
    with caplog.at_level(logging.WARNING, logger="structvit.data"):
        samples = [ds[i] for i in range(len(ds))]
    assert str(garbage) in caplog.text and str(cut) in caplog.text
    assert ds.num_bad_samples == 2 and {str(garbage), str(cut)} == set(ds.bad_files)
    assert samples[0] is None and samples[1] is None and samples[2][1] == 1
    # training: replaced by a readable sample (the good one, id 103, label 1)
    tr = VideoDataset(ann, sampler=FrameSampler("segment", num_frames=8), transform=_raw, train=True)
    got = [tr[i] for i in range(len(tr))]
    assert [s[1] for s in got] == [1, 1, 1]
    assert all(s[0].shape == (3, 8, 48, 64) for s in got)
    # bounded retries, then a clear error
    only_bad = [r for r in ann.records if r.path in (str(garbage), str(cut))]
    bad_ds = VideoDataset(only_bad, classes=ann.classes, sampler=FrameSampler(), transform=_raw, train=True,
                          max_retries=3)
    with pytest.raises(RuntimeError, match="2 unreadable files in a row"):
        bad_ds[0]  # every sample tried once: no sample is drawn twice
    few = VideoDataset(only_bad * 3, classes=ann.classes, sampler=FrameSampler(), transform=_raw, train=True,
                       max_retries=3)
    with pytest.raises(RuntimeError, match="4 unreadable files in a row"):
        few[0]  # bounded by max_retries
    # the check command finds both, with their paths
    assert data_main(["check", "--dataset", "ssv2", "--root", str(tmp_path / "ssv2"), "--split", "train"]) == 1


def test_missing_file_after_indexing_is_replaced_in_training(layouts, tmp_path):
    shutil.copytree(layouts["gym99"][0], tmp_path / "gym")
    ann = read_annotations("gym99", tmp_path / "gym", "train")
    os.remove(ann.records[0].path)
    ds = VideoDataset(ann, sampler=FrameSampler(num_frames=2), transform=_raw, train=True)
    _, label = ds[0]
    assert label == ann.records[1].label and ds.bad_files[0] == ann.records[0].path
    ev = VideoDataset(ann, sampler=FrameSampler(num_frames=2), transform=_raw, train=False, on_unreadable="replace")
    assert ev[0][1] == ann.records[1].label  # replacing is still available, on request
    with pytest.raises(ValueError, match="on_unreadable"):
        VideoDataset(ann, sampler=FrameSampler(), transform=_raw, train=False, on_unreadable="drop")


def test_bad_sample_count_is_shared_by_dataloader_workers(layouts, tmp_path):
    _with_bad_files(layouts["ssv2"][0], tmp_path / "ssv2")
    dm = VideoDataModule("ssv2", root=str(tmp_path / "ssv2"), num_frames=4, input_size=32, batch_size=1,
                         num_workers=2)
    labels = torch.cat([y for _, y in dm.val_dataloader()] + [y for _, y in dm.train_dataloader()])
    assert len(labels) == 5
    assert dm.num_bad_samples >= 2  # train split: the two bad files, counted in the workers


def test_check_command_clean_dataset(layouts, capsys):
    root, _ = layouts["ssv1"]
    assert data_main(["check", "--dataset", "ssv1", "--root", root, "--num-classes", "3", "--split", "train"]) == 0
    assert "no problems" in capsys.readouterr().out
    # the benchmark's class count (174) by default; a label of the train split missing from val
    assert data_main(["check", "--dataset", "ssv1", "--root", root]) == 1
    out = capsys.readouterr().out
    assert "3 classes, the ssv1 benchmark has 174" in out
    assert "label 'Holding something' appears only in the train split" in out
    assert data_main(["check", "--dataset", "nope", "--root", root]) == 2
    with pytest.raises(SystemExit):
        data_main(["check", "--root", root])  # --dataset is required


def test_export_moving_digits_as_ssv2_reads_back_identically(tmp_path):
    out = tmp_path / "md_ssv2"
    assert data_main(["export", "moving_digits", "--format", "ssv2", str(out), "--split", "val", "--limit", "12"]) == 0
    assert data_main(["check", "--dataset", "ssv2", "--root", str(out), "--split", "val", "--num-classes", "10"]) == 0
    ann = read_annotations("ssv2", out, "val")
    ref = moving_digits_dataset("val")
    assert [r.label for r in ann.records] == ref.targets[:12]
    assert ann.classes[0] == "Moving something from right to left"
    dm = VideoDataModule("ssv2", root=str(out), num_frames=8, input_size=32, crop="center", batch_size=12)
    x, y = next(iter(dm.val_dataloader()))
    ref_x = torch.stack([ref[i][0] for i in range(12)])
    assert torch.equal(y, torch.tensor(ref.targets[:12]))
    assert torch.equal(x, ref_x)  # lossless VP9: the exact pixels


def test_export_digits_as_imagefolder_reads_back_identically(tmp_path):
    out = tmp_path / "digits"
    assert data_main(["export", "digits", "--format", "imagefolder", str(out), "--limit", "30"]) == 0
    assert data_main(["export", "digits", "--format", "ssv2", str(out)]) == 2
    ref = DigitsDataset("val")
    ds = ImageFolderDataset(out, "val", classes=None)
    assert ds.classes == [str(i) for i in range(10)]
    got = {os.path.basename(p): (np.asarray(ds[i][0]), t) for i, (p, t) in enumerate(ds.samples)}
    for i in range(30):
        img, target = got[f"{ref.source_index[i]:04d}.png"]
        assert target == int(ref.targets[i])
        assert np.array_equal(img, ref.images[i].permute(1, 2, 0).numpy())


def test_image_folder_class_order_from_class_list(tmp_path):
    from PIL import Image

    for split, cls in (("train", "n02"), ("train", "n01"), ("val", "n01"), ("val", "stray")):
        d = tmp_path / split / cls
        d.mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(d / "a.JPEG")
    (tmp_path / "LOC_synset_mapping.txt").write_text("n02 goldfish\nn01 tench\n")
    ds = ImageFolderDataset(tmp_path, "val")
    assert ds.classes == ["n02", "n01"] and ds.targets == [1]
    assert any("stray" in p for p in ds.problems)
    (tmp_path / "train" / "n01" / "b.JPEG").write_bytes(b"broken")
    tr = ImageFolderDataset(tmp_path, "train")
    items = [tr[i][1] for i in range(len(tr))]
    assert tr.num_bad_samples == 1 and len(items) == 3


def test_check_flags_a_misspelled_kinetics_label(layouts, tmp_path, capsys):
    root = tmp_path / "k400"
    shutil.copytree(layouts["kinetics400"][0], root)
    train = root / "annotations" / "train.csv"
    lines = train.read_text().splitlines()
    lines[-1] = lines[-1].replace("abseiling", "abseilng")  # the 4th row: a class of its own
    train.write_text("\n".join(lines) + "\n")
    assert read_annotations("kinetics400", root, "train").num_classes == 4
    assert data_main(["check", "--dataset", "k400", "--root", str(root), "--num-classes", "3"]) == 1
    out = capsys.readouterr().out
    assert "4 classes, the kinetics400 benchmark has 3" in out
    assert "label 'abseilng' appears only in the train split" in out


def test_check_decodes_every_frame_unless_quick(layouts, tmp_path, capsys):
    root = tmp_path / "ssv1"
    shutil.copytree(layouts["ssv1"][0], root)
    folder = root / "20bn-something-something-v1" / "11"
    middle = sorted(folder.iterdir())[5]  # neither first, middle (8) nor last of 16
    middle.write_bytes(middle.read_bytes()[:200])  # a truncated JPEG
    args = ["check", "--dataset", "ssv1", "--root", str(root), "--split", "train", "--num-classes", "3"]
    assert data_main(args + ["--quick"]) == 0
    capsys.readouterr()
    assert data_main(args) == 1
    assert str(middle) in capsys.readouterr().out


def test_check_reports_progress(layouts):
    from structvit.data.scan import check_dataset

    seen = []
    check_dataset("ssv2", layouts["ssv2"][0], ("train",), num_classes=3, progress=seen.append, progress_every=0)
    assert seen and all("train:" in m and "samples decoded" in m for m in seen)


def test_ssv2_as_qualcomm_distributes_it(layouts, tmp_path):
    root = tmp_path / "ssv2"
    shutil.copytree(layouts["ssv2"][0], root)
    ldir = root / "labels"
    for long, short in (("labels", "labels"), ("train", "train"), ("validation", "validation")):
        (ldir / f"something-something-v2-{long}.json").rename(ldir / f"{short}.json")
    val = json.loads((ldir / "validation.json").read_text())
    (ldir / "test.json").write_text(json.dumps([{"id": e["id"]} for e in val]))
    info = layouts["ssv2"][1]
    for split in ("train", "val"):
        ann = read_annotations("ssv2", root, split)
        assert ann.problems == [] and ann.classes == info["classes"]
        assert [(r.name, r.label) for r in ann.records] == [(e[0], e[1]) for e in info["expected"][split]]
    test = read_annotations("ssv2", root, "test")
    assert [r.label for r in test.records] == [-1, -1] and test.problems == []
    # test-answers.csv (id;label) labels the test split
    (root / "labels" / "test-answers.csv").write_text(
        "".join(f"{e['id']};{ssv2_template_to_label(e['template'])}\n" for e in val))
    test = read_annotations("ssv2", root, "test")
    assert [r.label for r in test.records] == [e[1] for e in info["expected"]["val"]]
    shutil.rmtree(ldir)
    with pytest.raises(FileNotFoundError, match="labels.json|train.json"):
        read_annotations("ssv2", root, "train")


def test_kinetics_test_csv_without_labels(layouts, tmp_path):
    root = tmp_path / "k400"
    shutil.copytree(layouts["kinetics400"][0], root)
    val = (root / "annotations" / "val.csv").read_text().splitlines()
    rows = [ln.split(",", 1)[1] for ln in val]  # drop the label column
    (root / "annotations" / "test.csv").write_text("\n".join(rows) + "\n")
    shutil.copytree(root / "val", root / "test")
    ann = read_annotations("kinetics400", root, "test")
    assert ann.problems == [] and len(ann.records) == 2 and not ann.labelled
    assert ann.classes == ["abseiling", "air drumming", "zumba"]
    (root / "annotations" / "val.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match="no label column"):
        read_annotations("kinetics400", root, "val")


def _imagenet(tmp_path, *, kaggle=False):
    from PIL import Image

    base = tmp_path / "ILSVRC" / "Data" / "CLS-LOC" if kaggle else tmp_path
    wnids = ["n01440764", "n01443537", "n01484850"]
    for w in wnids:
        (base / "train" / w).mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), 50, np.uint8)).save(base / "train" / w / f"{w}_1.JPEG")
    (base / "val").mkdir(parents=True)
    truth = ["n01484850", "n01440764", "n01443537", "n01440764"]
    for i in range(len(truth)):
        Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(base / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG")
    (tmp_path / "LOC_synset_mapping.txt").write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish\n"
                                                     "n01484850 great white shark\n")
    return wnids, truth


@pytest.mark.parametrize("kaggle", [False, True])
def test_imagenet_flat_val_with_loc_val_solution(tmp_path, kaggle):
    wnids, truth = _imagenet(tmp_path, kaggle=kaggle)
    with open(tmp_path / "LOC_val_solution.csv", "w") as f:
        f.write("ImageId,PredictionString\n")
        for i, w in reversed(list(enumerate(truth))):  # any row order
            f.write(f"ILSVRC2012_val_{i + 1:08d},{w} 10 20 30 40 {w} 1 2 3 4\n")
    ds = ImageFolderDataset(tmp_path, "val")
    assert ds.classes == wnids and ds.targets == [wnids.index(w) for w in truth]
    assert ds.sample_ids == [f"ILSVRC2012_val_{i + 1:08d}" for i in range(4)]
    assert ds.class_descriptions["n01443537"] == "goldfish"
    assert ImageFolderDataset(tmp_path, "train").targets == [0, 1, 2]


def test_imagenet_flat_val_with_devkit_ground_truth(tmp_path):
    from scipy.io import savemat

    wnids, truth = _imagenet(tmp_path)
    # ILSVRC2012_IDs are not in wnid order: 1 -> the shark, 2 -> tench, 3 -> goldfish
    ids = {"n01484850": 1, "n01440764": 2, "n01443537": 3}
    dk = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    dk.mkdir(parents=True)
    synsets = np.zeros((3,), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")])
    for j, (w, i) in enumerate(ids.items()):
        synsets[j] = (i, w, w, 0)
    savemat(dk / "meta.mat", {"synsets": synsets})
    (dk / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ids[w]}\n" for w in truth))
    ds = ImageFolderDataset(tmp_path, "val")
    assert ds.targets == [wnids.index(w) for w in truth]
    os.remove(dk / "meta.mat")
    with pytest.raises(FileNotFoundError, match="meta.mat"):
        ImageFolderDataset(tmp_path, "val")
    os.remove(dk / "ILSVRC2012_validation_ground_truth.txt")
    with pytest.raises(FileNotFoundError, match="LOC_val_solution.csv"):
        ImageFolderDataset(tmp_path, "val")


def test_evaluation_loader_skips_unreadable_samples(layouts, tmp_path):
    _with_bad_files(layouts["ssv2"][0], tmp_path / "ssv2")
    dm = VideoDataModule("ssv2", root=str(tmp_path / "ssv2"), val_split="train", num_frames=4, input_size=32,
                         batch_size=2)
    batches = list(dm.val_dataloader())
    labels = torch.cat([b[1] for b in batches if b[0] is not None])
    assert labels.tolist() == [1]  # only the readable sample, once
    assert dm.num_skipped("val") == 2
    x, y, idx, skipped = next(iter(dm.predict_dataloader()))
    assert x is None and y.numel() == 0 and int(skipped) == 2  # the first batch: both unreadable
