"""Semantic segmentation: the ADE20K reader and check, the Semantic FPN head, the metrics,
the schedule, sliding-window inference, and the ADE20K configs through the CLI (2 steps)."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from structvit.data.ade20k import (IGNORE_INDEX, ADE20KDataModule, ADE20KDataset, SegEvalTransform,
                                   SegTrainTransform, check_ade20k, read_label)
from structvit.dense.semantic_fpn import SemanticFPNHead, build_semantic_fpn
from structvit.engine.segmentation import (CosineWarmup, SegmentationModule, confusion_matrix,
                                           segmentation_metrics, slide_inference)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
CONFIGS = ("ade20k_semfpn_structvit_s_4_1_h32.yaml", "ade20k_semfpn_uniformer_s_h32.yaml",
           "ade20k_semfpn_structvit_b_4_1_h32.yaml", "ade20k_semfpn_uniformer_b_h32.yaml")
NUM_CLASSES = 4


def _write_ade20k(root, counts=(("training", 4), ("validation", 2)), size=(40, 56), num_classes=NUM_CLASSES):
    """An ADE20K-layout folder: ADEChallengeData2016/images/<split>/*.jpg and annotations/<split>/*.png;
    labels 0 (ignore) .. num_classes, one class per horizontal band, the image's colour follows the class."""
    base = os.path.join(root, "ADEChallengeData2016")
    rng = np.random.default_rng(0)
    h, w = size
    for split, n in counts:
        os.makedirs(os.path.join(base, "images", split))
        os.makedirs(os.path.join(base, "annotations", split))
        prefix = "ADE_train" if split == "training" else "ADE_val"
        for i in range(n):
            label = np.zeros((h, w), np.uint8)
            bands = rng.permutation(num_classes + 1)
            for b, value in enumerate(bands):
                label[b * h // len(bands):(b + 1) * h // len(bands)] = value
            lab = label.astype(np.int64)
            image = np.stack([lab * 50, 255 - lab * 40, (lab * 90) % 256], -1)
            image = np.clip(image + rng.integers(0, 20, image.shape), 0, 255).astype(np.uint8)
            name = f"{prefix}_{i + 1:08d}"
            Image.fromarray(image).save(os.path.join(base, "images", split, name + ".jpg"), quality=95)
            Image.fromarray(label, mode="L").save(os.path.join(base, "annotations", split, name + ".png"))
    return base


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    return _write_ade20k(str(tmp_path_factory.mktemp("ade")))


def test_read_label_reduces_zero(tmp_path):
    path = str(tmp_path / "a.png")
    Image.fromarray(np.array([[0, 1, 150], [2, 0, 3]], np.uint8), mode="L").save(path)
    assert read_label(path).tolist() == [[255, 0, 149], [1, 255, 2]]
    assert read_label(path, reduce_zero_label=False).tolist() == [[0, 1, 150], [2, 0, 3]]
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(path)
    with pytest.raises(ValueError, match="single-channel"):
        read_label(path)


def test_dataset_items_and_pipelines(ade):
    val = ADE20KDataset(os.path.dirname(ade), "val", num_classes=NUM_CLASSES)  # the folder holding it works too
    assert len(val) == 2
    item = val[0]
    # val: resized keeping the ratio into (2048, 512): 40 x 56 -> short side 512 (long 717 <= 2048)
    assert tuple(item["image"].shape) == (3, 512, 717) and tuple(item["label"].shape) == (40, 56)
    assert set(item["label"].unique().tolist()) <= {0, 1, 2, 3, IGNORE_INDEX}
    train = ADE20KDataset(ade, "train", SegTrainTransform(32, scale=(64, 32), seed=0), num_classes=NUM_CLASSES)
    item = train[1]
    assert tuple(item["image"].shape) == (3, 32, 32) and tuple(item["label"].shape) == (32, 32)
    assert item["label"].dtype == torch.int64
    with pytest.raises(ValueError, match="num_classes=2"):
        ADE20KDataset(ade, "val", num_classes=2)[0]


def test_train_transform_resize_crop_pad_flip():
    image = torch.rand(3, 20, 30)
    label = torch.arange(30).repeat(20, 1).to(torch.uint8)  # label = column index
    t = SegTrainTransform(crop_size=64, scale=(60, 20), ratio_range=(1.0, 1.0), cat_max_ratio=None, flip=1.0,
                          photometric=False, mean=(0, 0, 0), std=(1, 1, 1), seed=0)
    img, lab = t(image, label)
    # rescaled to 20 x 30 (already inside (60, 20)), padded to 64 x 64 with 0 / 255, flipped
    assert tuple(img.shape) == (3, 64, 64)
    assert lab[:20, :30].tolist() == [list(range(29, -1, -1))] * 20
    assert (lab[20:] == IGNORE_INDEX).all() and (lab[:, 30:] == IGNORE_INDEX).all() and (img[:, 20:] == 0).all()
    torch.testing.assert_close(img[:, :20, :30], image.flip(-1))
    img, lab = SegEvalTransform(scale=(60, 40), mean=(0, 0, 0), std=(1, 1, 1))(image, label)
    assert tuple(img.shape) == (3, 40, 60) and torch.equal(lab, label.long())


def test_check_names_each_problem(tmp_path):
    base = _write_ade20k(str(tmp_path), counts=(("training", 3), ("validation", 2)))
    assert check_ade20k(base, num_classes=NUM_CLASSES) == []
    ann = os.path.join(base, "annotations", "training")
    os.remove(os.path.join(ann, "ADE_train_00000001.png"))
    Image.fromarray(np.zeros((10, 10), np.uint8), mode="L").save(os.path.join(ann, "ADE_train_00000002.png"))
    Image.fromarray(np.full((40, 56), 151, np.uint8), mode="L").save(os.path.join(ann, "ADE_train_00000003.png"))
    Image.fromarray(np.zeros((4, 4), np.uint8), mode="L").save(os.path.join(ann, "ADE_train_00000099.png"))
    problems = check_ade20k(base)
    text = "\n".join(problems)
    assert len(problems) == 4, text
    assert "ADE_train_00000001.png: annotation missing" in text
    assert "ADE_train_00000002.png: annotation is 10x10, its image 56x40" in text
    assert "ADE_train_00000003.png: label value 151 above 150 classes" in text
    assert "ADE_train_00000099.png: annotation without an image" in text
    assert check_ade20k(str(tmp_path / "nothing"))[0].startswith("root must be an ADE20K folder")


def test_check_is_registered_in_data_check(tmp_path):
    from structvit.data.scan import check_dataset

    base = _write_ade20k(str(tmp_path), counts=(("training", 1), ("validation", 1)))
    assert check_dataset("ade20k", base, num_classes=NUM_CLASSES) == []
    os.remove(os.path.join(base, "annotations", "validation", "ADE_val_00000001.png"))
    assert any("annotation missing" in p for p in check_dataset("ade20k", base, num_classes=NUM_CLASSES))


def test_confusion_matrix_and_metrics_by_hand():
    label = torch.tensor([[0, 0, 1, 255], [1, 2, 2, 2]])
    pred = torch.tensor([[0, 1, 1, 2], [1, 2, 0, 2]])
    conf = confusion_matrix(pred, label, 4)
    # rows true, columns predicted; the ignored pixel is left out; class 3 never appears
    assert conf.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
    m = segmentation_metrics(conf)
    # IoU: class 0 1/(2+2-1)=1/3, class 1 2/(2+3-2)=2/3, class 2 2/(3+2-2)=2/3; class 3 absent
    assert math.isclose(m["miou"], 100 * (1 / 3 + 2 / 3 + 2 / 3) / 3)
    assert math.isclose(m["macc"], 100 * (1 / 2 + 1 + 2 / 3) / 3)
    assert math.isclose(m["aacc"], 100 * 5 / 7)
    with pytest.raises(ValueError, match="label values"):
        confusion_matrix(pred, torch.full_like(label, 7), 4)


def test_cosine_warmup_is_mmcvs():
    s = CosineWarmup(100, warmup_iters=10, warmup_ratio=0.1, min_ratio=0.0)
    assert math.isclose(s(0), 0.1)  # warm-up starts at the ratio
    assert math.isclose(s(5), (1 - 0.5 * 0.9) * 0.5 * (1 + math.cos(math.pi * 0.05)))
    assert math.isclose(s(50), 0.5) and math.isclose(s(100), 0.0, abs_tol=1e-12)


def test_semantic_fpn_head_layout_and_output_size():
    head = SemanticFPNHead(256, (4, 8, 16, 32), num_classes=7)
    # stages to stride 4: 1, 1, 2, 3 conv-norm-ReLU blocks; upsampling on all but the finest
    convs = [sum(isinstance(m, torch.nn.Conv2d) for m in s) for s in head.scale_heads]
    ups = [sum(isinstance(m, torch.nn.Upsample) for m in s) for s in head.scale_heads]
    assert convs == [1, 1, 2, 3] and ups == [0, 1, 2, 3]
    model = build_semantic_fpn("structvit_tiny", 7, backbone_kwargs=dict(dense=True, window_size=2)).eval()
    assert model(torch.randn(2, 3, 70, 90)).shape == (2, 7, 70, 90)
    with pytest.raises(ValueError, match="norm"):
        SemanticFPNHead(norm="ln")


def test_slide_inference_covers_every_pixel_and_matches_a_pointwise_model():
    model = torch.nn.Conv2d(3, 5, 1)  # pointwise: every crop gives the whole-image logits
    image = torch.randn(1, 3, 50, 75)
    out = slide_inference(model, image, 5, crop_size=32, stride=21)
    torch.testing.assert_close(out, model(image))
    calls = []
    slide_inference(lambda x: calls.append(tuple(x.shape[-2:])) or torch.zeros(1, 5, *x.shape[-2:]), image, 5,
                    crop_size=32, stride=21)
    # mmseg: rows = (50 - 32 + 20) // 21 + 1 = 2, columns = (75 - 32 + 20) // 21 + 1 = 4
    assert len(calls) == 2 * 4 and set(calls) == {(32, 32)}


def test_module_fits_a_batch_validates_and_checks_classes(ade):
    """The module's training step lowers the loss on a fixed batch; validation (sliding window)
    logs mIoU / mAcc / aAcc in percent; a class count other than the dataset's is refused."""
    import lightning as L

    torch.manual_seed(0)
    dm = ADE20KDataModule(ade, num_classes=NUM_CLASSES, batch_size=2, crop_size=32, scale=(64, 32),
                          test_scale=(64, 32), photometric=False, num_workers=0, seed=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module = SegmentationModule("structvit_tiny", NUM_CLASSES, model_kwargs=dict(dense=True, window_size=2),
                                inference="slide", crop_size=32, stride=21)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        logits = module(batch["image"])
        loss = torch.nn.functional.cross_entropy(logits, batch["label"], ignore_index=IGNORE_INDEX)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.6 * losses[0], losses
    metrics = L.Trainer(logger=False, enable_progress_bar=False).validate(module, dm, verbose=False)[0]
    assert set(metrics) == {"val/miou", "val/macc", "val/aacc"}
    assert all(0 <= v <= 100 for v in metrics.values())
    bad = SegmentationModule("structvit_tiny", 7)
    with pytest.raises(ValueError, match="dataset has 4 classes"):
        L.Trainer(max_steps=1, logger=False, enable_progress_bar=False).validate(bad, dm, verbose=False)


@pytest.mark.parametrize("config", CONFIGS)
def test_config_smoke_run(config, ade, tmp_path):
    """configs/ade20k_semfpn_*.yaml with --data.root DIR --model.model structvit_tiny: fit 2 steps, then validate."""
    from structvit.engine.cli import main

    run = str(tmp_path / "run")
    common = ["--config", os.path.join(ROOT, "configs", config), "--data.root", ade, "--model.model", "structvit_tiny",
              "--data.num_classes", str(NUM_CLASSES), "--data.crop_size", "32", "--data.scale", "[64, 32]",
              "--data.test_scale", "[64, 32]", "--data.batch_size", "2", "--data.num_workers", "0",
              "--trainer.default_root_dir", run, "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    assert main(["fit", *common, "--trainer.max_steps", "2", "--trainer.num_sanity_val_steps", "0"]) == 0
    assert os.path.isfile(os.path.join(run, "checkpoints", "last.ckpt"))
    if config == CONFIGS[0]:
        assert main(["validate", *common, "--ckpt_path", "last"]) == 0


@pytest.mark.slow  # four Lightning runs (two variants, fit and validate)
def test_segment_scenes_command_writes_its_page(tmp_path, capsys):
    """`structvit segment-scenes` (2 steps on a few scenes): both attention kinds and the chance row."""
    from structvit import cli

    page = tmp_path / "page.md"
    assert cli.main(["segment-scenes", "--train", "4", "--val", "2", "--size", "48", "--steps", "2",
                     "--batch-size", "2", "--write", str(page)]) == 0
    text = page.read_text()
    assert text == capsys.readouterr().out
    assert "Written by `structvit segment-scenes --train 4 --val 2" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| attention")]
    assert [r.split(" | ")[0] for r in rows] == ["| StructSA", "| SA", "| chance (every pixel class 0: background)"]
