"""Built-in digit scenes (structvit.data.scenes) and their COCO / ADE20K exports."""
import os

import numpy as np
import pytest

pytest.importorskip("pycocotools")
from PIL import Image  # noqa: E402

from structvit.data import scenes as sc  # noqa: E402
from structvit.data.coco import CocoDetection, check_coco  # noqa: E402


def test_scenes_are_deterministic_with_tight_boxes_and_disjoint_masks():
    a = list(sc.make_scenes("train", 6, seed=3, size=64))
    b = list(sc.make_scenes("train", 6, seed=3, size=64))
    c = list(sc.make_scenes("val", 6, seed=3, size=64))
    assert all(np.array_equal(x.image, y.image) and np.array_equal(x.masks, y.masks) for x, y in zip(a, b))
    assert not np.array_equal(a[0].image, c[0].image)
    for s in a + c:
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        assert 1 <= len(s.labels) <= 5 and set(s.labels.tolist()) <= set(range(10))
        assert (s.masks.sum(0) <= 1).all()  # one owner per pixel: occluded parts belong to the front digit
        for m, box in zip(s.masks, s.boxes):
            ys, xs = np.nonzero(m)
            assert m.sum() >= 30
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        sem = s.semantic()
        assert set(np.unique(sem)) <= set(range(1, 12)) and (sem == 1).sum() > 0.5 * sem.size
        for m, label in zip(s.masks, s.labels):
            assert (sem[m] == label + 2).all()


def test_scenes_draw_digits_of_their_split_only(monkeypatch):
    drawn = []
    real = sc.make_scene

    def spy(rng, sources, **kwargs):
        drawn.append(set(sources.tolist()))
        return real(rng, sources, **kwargs)

    monkeypatch.setattr(sc, "make_scene", spy)
    list(sc.make_scenes("train", 1, size=64))
    list(sc.make_scenes("val", 1, size=64))
    assert drawn[0] == set(sc.digits_split("train").tolist()) and not drawn[0] & drawn[1]


def test_coco_export_reads_back_exactly(tmp_path):
    counts = sc.export_scenes(str(tmp_path), format="coco", counts={"train": 3, "val": 2}, size=64)
    assert counts == {"train": 3, "val": 2}
    assert check_coco(str(tmp_path), num_classes=10) == []
    expected = list(sc.make_scenes("val", 2, size=64))
    ds = CocoDetection(str(tmp_path), "val2017")
    assert ds.classes == list(sc.SCENE_CLASSES) and len(ds) == 2
    for scene, (image, target) in zip(expected, (ds[0], ds[1])):
        assert np.array_equal((image * 255).round().byte().permute(1, 2, 0).numpy(), scene.image)
        assert target["labels"].tolist() == (scene.labels + 1).tolist()
        assert np.array_equal(target["boxes"].numpy(), scene.boxes)
        assert np.array_equal(target["masks"].numpy().astype(bool), scene.masks)


def test_ade20k_export_layout_and_labels(tmp_path):
    sc.export_scenes(str(tmp_path), format="ade20k", counts={"train": 2, "val": 1}, size=64)
    assert sorted(os.listdir(tmp_path / "images" / "training")) == ["ADE_train_00000001.png", "ADE_train_00000002.png"]
    assert os.listdir(tmp_path / "annotations" / "validation") == ["ADE_val_00000001.png"]
    scene = next(sc.make_scenes("val", 1, size=64))
    label = np.asarray(Image.open(tmp_path / "annotations" / "validation" / "ADE_val_00000001.png"))
    assert label.dtype == np.uint8 and np.array_equal(label, scene.semantic())
    assert np.array_equal(np.asarray(Image.open(tmp_path / "images" / "validation" / "ADE_val_00000001.png")), scene.image)
    assert (tmp_path / "classes.txt").read_text().split("\n")[:2] == ["background", "digit 0"]


def test_bad_export_arguments():
    with pytest.raises(ValueError, match="format must be 'coco' or 'ade20k'"):
        sc.export_scenes("unused", format="voc")
    with pytest.raises(ValueError, match="splits train / val"):
        sc.export_scenes("unused", counts={"test": 3})
    with pytest.raises(ValueError, match="size must be an int >= 48"):
        next(sc.make_scenes("train", 1, size=16))
