"""The COCO reader (structvit.data.coco) on small COCO folders the tests write."""
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")
from PIL import Image  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402

from structvit.data.coco import (  # noqa: E402
    CocoDataModule,
    CocoDetection,
    CocoFormatError,
    check_coco,
    collate_detection,
    load_coco_json,
)

H, W = 32, 40


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle["counts"].decode()}


def _write(root, split="val2017", *, images=None, annotations=None, categories=None, extra=None):
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    os.makedirs(os.path.join(root, split), exist_ok=True)
    images = images if images is not None else []
    for im in images:
        if "file_name" in im and isinstance(im["file_name"], str) and "/" not in im["file_name"]:
            pixels = np.random.default_rng(im["id"]).integers(0, 256, (im["height"], im["width"], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, split, im["file_name"]))
    data = {"images": images, "annotations": annotations or [], "categories": categories or []}
    data.update(extra or {})
    path = os.path.join(root, "annotations", f"instances_{split}.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path


CATEGORIES = [{"id": 1, "name": "person"}, {"id": 5, "name": "airplane"}, {"id": 90, "name": "toothbrush"}]


def _valid(root, split="val2017"):
    """Three images: 1 with a polygon, a compressed and an uncompressed RLE object and a crowd
    region; 2 with a single crowd region only; 3 with nothing."""
    square = np.zeros((H, W), bool)
    square[4:12, 20:30] = True
    ring = np.zeros((H, W), bool)
    ring[14:26, 2:14] = True
    ring[17:23, 5:11] = False  # a hole: polygons cannot say it, RLE can
    counts = []
    flat = square.T.reshape(-1).astype(np.uint8)  # column-major runs, starting with zeros
    value, run = 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    uncompressed = mask_utils.frPyObjects({"size": [H, W], "counts": counts}, H, W)
    assert (mask_utils.decode(uncompressed) == square).all()
    images = [{"id": i, "file_name": f"{i:012d}.png", "height": H, "width": W} for i in (1, 2, 3)]
    annotations = [
        {"id": 10, "image_id": 1, "category_id": 5, "bbox": [2.0, 3.0, 10.0, 8.0], "iscrowd": 0, "area": 80.0,
         "segmentation": [[2, 3, 12, 3, 12, 11, 2, 11]]},
        {"id": 11, "image_id": 1, "category_id": 90, "bbox": [2.0, 14.0, 12.0, 12.0], "iscrowd": 0, "area": 108.0,
         "segmentation": _rle(ring)},
        {"id": 12, "image_id": 1, "category_id": 1, "bbox": [20.0, 4.0, 10.0, 8.0], "iscrowd": 0, "area": 80.0,
         "segmentation": {"size": [H, W], "counts": counts}},
        {"id": 13, "image_id": 1, "category_id": 1, "bbox": [30.0, 20.0, 8.0, 8.0], "iscrowd": 1, "area": 64.0,
         "segmentation": _rle(np.pad(np.ones((8, 8), bool), ((20, 4), (30, 2))))},
        {"id": 14, "image_id": 2, "category_id": 1, "bbox": [0.0, 0.0, 8.0, 8.0], "iscrowd": 1, "area": 64.0,
         "segmentation": _rle(np.pad(np.ones((8, 8), bool), ((0, H - 8), (0, W - 8))))},
    ]
    _write(root, split, images=images, annotations=annotations, categories=CATEGORIES)
    return square, ring


def test_reads_boxes_labels_masks_and_maps_categories(tmp_path):
    square, ring = _valid(tmp_path)
    ds = CocoDetection(str(tmp_path), "val2017")
    assert ds.num_classes == 3 and ds.classes == ["person", "airplane", "toothbrush"]
    assert ds.category_to_label == {1: 1, 5: 2, 90: 3} and ds.label_to_category == {1: 1, 2: 5, 3: 90}
    assert len(ds) == 3  # evaluation keeps every image, with or without objects
    image, target = ds[0]
    assert image.shape == (3, H, W) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    # the crowd region is not a target
    assert target["labels"].tolist() == [2, 3, 1]
    assert torch.equal(target["boxes"], torch.tensor([[2.0, 3, 12, 11], [2, 14, 14, 26], [20, 4, 30, 12]]))
    masks = target["masks"]
    assert masks.shape == (3, H, W) and masks.dtype == torch.uint8
    assert torch.equal(masks[1].bool(), torch.from_numpy(ring))
    assert torch.equal(masks[2].bool(), torch.from_numpy(square))
    polygon = masks[0].bool()
    assert polygon[4:10, 3:11].all() and not polygon[:, 14:].any() and not polygon[13:].any()
    assert target["image_id"] == 1 and target["orig_size"] == (H, W)
    _, only_crowd = ds[1]
    assert only_crowd["boxes"].shape == (0, 4) and only_crowd["masks"].shape == (0, H, W)


def test_training_skips_images_without_objects_and_flips_consistently(tmp_path):
    _valid(tmp_path, "train2017")
    ds = CocoDetection(str(tmp_path), "train2017", train=True, flip_prob=1.0)
    assert ds.image_ids == [1]  # image 2 (crowd only) and image 3 (empty) skipped
    plain = CocoDetection(str(tmp_path), "train2017", train=True, flip_prob=0.0)
    (img_f, t_f), (img, t) = ds[0], plain[0]
    assert torch.equal(img_f, img.flip(-1))
    assert torch.equal(t_f["masks"], t["masks"].flip(-1))
    assert torch.equal(t_f["boxes"][:, 0], W - t["boxes"][:, 2]) and torch.equal(t_f["boxes"][:, 2], W - t["boxes"][:, 0])
    assert torch.equal(t_f["boxes"][:, 1::2], t["boxes"][:, 1::2])
    # the flipped boxes still enclose the flipped masks exactly
    for box, mask in zip(t_f["boxes"], t_f["masks"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if len(xs):
            assert box[0] <= xs.min() and xs.max() + 1 <= box[2]


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d.pop("annotations"), "not a COCO annotation file"),
    (lambda d: d["annotations"][0].update(category_id=7), "unknown category id 7"),
    (lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3, 4, 5, 6, 7]]), "odd number of coordinates"),
    (lambda d: d["annotations"][1]["segmentation"].update(counts="\x7f!!garbage"), "bad RLE"),
    (lambda d: d["annotations"][2]["segmentation"].update(counts=[5, 5]), "bad RLE"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, -3, 4]), "bbox must be"),
    (lambda d: d["annotations"][0].update(image_id=99), "unknown image id 99"),
    (lambda d: d["images"][0].pop("height"), "lacks one of"),
])
def test_bad_annotation_files_are_named(tmp_path, mutate, needle):
    _valid(tmp_path)
    path = os.path.join(tmp_path, "annotations", "instances_val2017.json")
    with open(path) as f:
        data = json.load(f)
    mutate(data)
    with open(path, "w") as f:
        json.dump(data, f)
    with pytest.raises(CocoFormatError, match=needle) as err:
        CocoDetection(str(tmp_path), "val2017")
    assert path in str(err.value)
    assert any(needle in p and path in p for p in check_coco(str(tmp_path), ["val2017"]))


def test_not_json_and_missing_file(tmp_path):
    os.makedirs(tmp_path / "annotations")
    (tmp_path / "annotations" / "instances_val2017.json").write_text("<html>")
    with pytest.raises(CocoFormatError, match="not JSON"):
        load_coco_json(str(tmp_path / "annotations" / "instances_val2017.json"))
    with pytest.raises(FileNotFoundError, match="instances_train2017.json"):
        CocoDetection(str(tmp_path), "train2017")
    assert check_coco(str(tmp_path), ["train2017"]) == [
        f"{tmp_path / 'annotations' / 'instances_train2017.json'}: missing annotation file"]


def test_check_names_missing_resized_and_escaping_images(tmp_path):
    _valid(tmp_path)
    assert check_coco(str(tmp_path), ["val2017"], num_classes=3) == []
    assert check_coco(str(tmp_path), ["val2017"]) == [
        f"{tmp_path / 'annotations' / 'instances_val2017.json'}: 3 categories, expected 80 "
        "(COCO's; --num-classes for another set)"]
    os.remove(tmp_path / "val2017" / "000000000002.png")
    Image.new("RGB", (W + 1, H)).save(tmp_path / "val2017" / "000000000003.png")
    path = tmp_path / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    data["images"].append({"id": 4, "file_name": "../../etc/passwd", "height": H, "width": W})
    path.write_text(json.dumps(data))
    problems = check_coco(str(tmp_path), ["val2017"], num_classes=3)
    assert len(problems) == 3, problems
    assert "missing image file" in problems[0] and "000000000002.png" in problems[0]
    assert "is 41x32, its annotation says 40x32" in problems[1]
    assert "leaves" in problems[2] and "etc/passwd" in problems[2]
    ds = CocoDetection(str(tmp_path), "val2017")
    with pytest.raises(FileNotFoundError, match="000000000002.png"):
        ds[1]
    with pytest.raises(CocoFormatError, match="leaves"):
        ds[3]


def test_datamodule_batches_lists(tmp_path):
    _valid(tmp_path, "train2017")
    _valid(tmp_path, "val2017")
    dm = CocoDataModule(str(tmp_path), batch_size=2, num_workers=0, flip_prob=0.0)
    assert dm.num_classes == 3 and dm.classes == ["person", "airplane", "toothbrush"]
    dm.setup("fit")
    images, targets = next(iter(dm.val_dataloader()))
    assert isinstance(images, list) and len(images) == 2 and [t["image_id"] for t in targets] == [1, 2]
    images, targets = next(iter(dm.train_dataloader()))
    assert len(images) == 1 and targets[0]["labels"].tolist() == [2, 3, 1]
    assert collate_detection([(1, "a"), (2, "b")]) == ([1, 2], ["a", "b"])
    with pytest.raises(NotADirectoryError, match="data.root"):
        CocoDataModule(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="flip_prob"):
        CocoDataModule(str(tmp_path), flip_prob=2.0)


def test_data_check_and_export_commands(tmp_path, capsys):
    from structvit.data.check import main

    assert main(["export", "scenes", str(tmp_path / "coco"), "--format", "coco", "--limit", "2"]) == 0
    assert main(["check", "--dataset", "coco", "--root", str(tmp_path / "coco"), "--num-classes", "10"]) == 0
    assert "no problems" in capsys.readouterr().out
    os.remove(tmp_path / "coco" / "val2017" / "000000000002.png")
    assert main(["check", "--dataset", "coco", "--root", str(tmp_path / "coco"), "--num-classes", "10"]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM" in out and "missing image file" in out and "000000000002.png" in out
    assert main(["export", "scenes", str(tmp_path / "x"), "--format", "ssv2"]) == 2
    assert "scenes can be exported as coco or ade20k, not ssv2" in capsys.readouterr().err
