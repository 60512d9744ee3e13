"""Mask R-CNN over StructViT (structvit.dense.mask_rcnn), its Lightning module and COCO
evaluation (structvit.engine.detection), and the detection configs through the CLI."""
import os

import pytest
import torch

pytest.importorskip("pycocotools")
pytest.importorskip("torchvision")

from structvit.data.coco import CocoDataModule, CocoDetection  # noqa: E402
from structvit.data.scenes import export_scenes  # noqa: E402
from structvit.dense.mask_rcnn import build_mask_rcnn  # noqa: E402
from structvit.engine.detection import DetectionModule, StepSchedule, coco_evaluate, coco_results  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
# a detector small enough for CPU tests: few proposals and RoIs, 64-pixel images
SMALL = dict(rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=100,
             rpn_post_nms_top_n_test=50, box_batch_size_per_image=32, box_detections_per_img=10)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes_coco")
    export_scenes(str(root), format="coco", counts={"train": 4, "val": 3}, size=64)
    return str(root)


def test_detector_has_torchvision_maskrcnn_fpn_layout():
    model = build_mask_rcnn("structvit_tiny", 11, min_size=64, max_size=96, **SMALL).eval()
    feats = model.backbone(torch.zeros(1, 3, 64, 96))
    assert list(feats) == ["0", "1", "2", "3", "pool"]
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
    assert all(f.shape[1] == 256 for f in feats.values()) and model.backbone.out_channels == 256
    assert model.rpn.anchor_generator.sizes == ((32,), (64,), (128,), (256,), (512,))
    assert model.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2", "3"]
    assert model.roi_heads.box_roi_pool.output_size == (7, 7) and model.roi_heads.mask_roi_pool.output_size == (14, 14)
    assert model.roi_heads.box_predictor.cls_score.out_features == 11
    assert model.transform.min_size == (64,) and model.transform.max_size == 96
    cfg = model.backbone.body.pretrained_cfg
    assert model.transform.image_mean == list(cfg["mean"]) and model.transform.image_std == list(cfg["std"])
    defaults = build_mask_rcnn("structvit_tiny", 81)
    assert defaults.transform.min_size == (800,) and defaults.transform.max_size == 1333
    # RPN and RoI heads are maskrcnn_resnet50_fpn's, tensor for tensor
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    reference = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=81)
    for part in ("rpn", "roi_heads"):
        ours = {k: tuple(v.shape) for k, v in getattr(defaults, part).state_dict().items()}
        assert ours == {k: tuple(v.shape) for k, v in getattr(reference, part).state_dict().items()}


@pytest.mark.parametrize("kwargs, needle", [
    (dict(model="no_such_model"), "registered backbone"),
    (dict(num_classes=1), "num_classes must be an int >= 2"),
    (dict(min_size=800, max_size=600), "max_size must be >= min_size"),
])
def test_bad_detector_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        build_mask_rcnn(**{"model": "structvit_tiny", "num_classes": 3, **kwargs})


def test_step_schedule_is_mmdet_1x():
    s = StepSchedule(steps_per_epoch=100, lr_steps=(8, 11), lr_gamma=0.1, warmup_iters=500, warmup_ratio=0.001)
    assert s(0) == pytest.approx(0.001) and s(250) == pytest.approx(0.5005) and s(500) == 1.0
    assert s(799) == 1.0 and s(800) == pytest.approx(0.1) and s(1099) == pytest.approx(0.1)
    assert s(1100) == pytest.approx(0.01) and s(1199) == pytest.approx(0.01)


def test_coco_evaluation_of_ground_truth_and_of_wrong_labels(scenes):
    ds = CocoDetection(scenes, "val2017")
    ids, dets, wrong = [], [], []
    for i in range(len(ds)):
        _, t = ds[i]
        n = len(t["labels"])
        det = {"boxes": t["boxes"], "labels": t["labels"], "scores": torch.linspace(1, 0.5, n),
               "masks": t["masks"][:, None].float()}
        dets.append(det)
        wrong.append({**det, "labels": t["labels"] % 10 + 1})  # every label wrong
        ids.append(t["image_id"])
    boxes, masks = coco_results(dets, ids, ds.label_to_category)
    assert len(boxes) == len(masks) == sum(len(d["labels"]) for d in dets)
    assert boxes[0]["bbox"][2:] == [float(dets[0]["boxes"][0, 2] - dets[0]["boxes"][0, 0]),
                                    float(dets[0]["boxes"][0, 3] - dets[0]["boxes"][0, 1])]
    for iou_type, results in (("bbox", boxes), ("segm", masks)):
        perfect = coco_evaluate(ds.coco, results, iou_type, ids)
        assert perfect["ap"] == pytest.approx(100.0) and perfect["ap50"] == pytest.approx(100.0)
    bad_boxes, _ = coco_results(wrong, ids, ds.label_to_category)
    assert coco_evaluate(ds.coco, bad_boxes, "bbox", ids)["ap"] == 0.0
    assert coco_evaluate(ds.coco, [], "bbox", ids)["ap50"] == 0.0


def test_module_trains_and_rejects_a_class_count_of_another_dataset(scenes):
    torch.manual_seed(0)
    module = DetectionModule("structvit_tiny", num_classes=10, min_size=64, max_size=64, detector_kwargs=SMALL)
    dm = CocoDataModule(scenes, batch_size=2, num_workers=0)
    dm.setup("fit")
    images, targets = next(iter(dm.train_dataloader()))
    losses = module.model(images, [{k: t[k] for k in ("boxes", "labels", "masks")} for t in targets])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    loss = sum(losses.values())
    loss.backward()
    assert torch.isfinite(loss)
    # the loss reaches the backbone
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.model.backbone.body.parameters())
    wrong = DetectionModule("structvit_tiny", num_classes=80, min_size=64, max_size=64, detector_kwargs=SMALL)

    class _Trainer:
        datamodule = dm

    wrong._trainer = _Trainer()
    with pytest.raises(ValueError, match="num_classes is 80 but the dataset has 10 categories"):
        wrong.setup("fit")


def test_no_weight_decay_on_norms_biases_and_position_tables():
    module = DetectionModule("structvit_tiny", num_classes=3, min_size=64, max_size=64, detector_kwargs=SMALL)
    from structvit.engine.optim import param_groups

    decayed, plain = param_groups(module.model, 0.05)
    assert plain["weight_decay"] == 0.0 and decayed["weight_decay"] == 0.05
    assert any("pos_embed" in n for n in plain["names"]) and not any("pos_embed" in n for n in decayed["names"])
    assert all("norm" not in n.rsplit(".", 2)[-2] for n in decayed["names"])


def test_config_fit_two_steps_then_validate(scenes, tmp_path):
    """configs/coco_maskrcnn_*.yaml with `--data.root DIR --model.model structvit_tiny`: fit 2 steps, validate."""
    import json

    from structvit.engine.cli import main

    run = str(tmp_path / "run")
    common = ["--config", os.path.join(ROOT, "configs", "coco_maskrcnn_structvit_s_4_1_h14.yaml"),
              "--data.root", scenes, "--model.model", "structvit_tiny", "--model.min_size", "64",
              "--model.max_size", "64", "--model.detector_kwargs", json.dumps(SMALL), "--data.num_workers", "0",
              "--trainer.default_root_dir", run, "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    assert main(["fit", *common, "--trainer.max_steps", "2", "--trainer.num_sanity_val_steps", "0"]) == 0
    assert os.path.isfile(os.path.join(run, "checkpoints", "last.ckpt"))
    assert main(["validate", *common, "--ckpt_path", "last"]) == 0
    # structvit predict --config: the test split's detections in COCO's results format
    assert main(["predict", *common, "--ckpt_path", "last"]) == 0
    gt = CocoDetection(scenes, "val2017").coco
    for kind in ("bbox", "segm"):
        with open(os.path.join(run, f"detections_{kind}.json")) as f:
            results = json.load(f)
        assert results and {r["image_id"] for r in results} <= set(gt.imgs)
        assert {r["category_id"] for r in results} <= set(gt.cats)
        gt.loadRes(results)  # pycocotools accepts them as results

    # structvit predict IMAGE --checkpoint: the .ckpt and its .safetensors export give the same detections
    from structvit.predict import main as predict_main

    image = os.path.join(scenes, "val2017", "000000000001.png")
    outputs = {}
    for name in ("last.ckpt", "last.safetensors"):
        out = str(tmp_path / name)
        assert predict_main([image, "--checkpoint", os.path.join(run, "checkpoints", name), "--out", out,
                             "--score-threshold", "0"]) == 0
        with open(os.path.join(out, "000000000001.json")) as f:
            outputs[name] = json.load(f)
        from PIL import Image

        with Image.open(os.path.join(out, "000000000001_overlay.png")) as im:
            assert im.size == (64, 64)
    assert outputs["last.ckpt"] == outputs["last.safetensors"]
    result = outputs["last.ckpt"]
    assert result["size"] == [64, 64] and result["detections"], result
    for det in result["detections"]:
        assert det["name"] == str(det["label"] - 1) and 0 <= det["score"] <= 1 and len(det["box"]) == 4
        assert det["mask"]["size"] == [64, 64] and isinstance(det["mask"]["counts"], str)

    # a checkpoint naming a detector option outside the known numeric ones is refused
    from structvit.checkpoint import read_checkpoint, write_safetensors
    from structvit.dense.predict import predict_detections

    ckpt = read_checkpoint(os.path.join(run, "checkpoints", "last.safetensors"))
    hp = json.loads(ckpt.metadata["hparams"])
    hp["detector_kwargs"] = {"box_predictor": "os.system"}
    hostile = str(tmp_path / "hostile.safetensors")
    write_safetensors(hostile, ckpt.state_dict, dict(ckpt.metadata, hparams=json.dumps(hp)))
    with pytest.raises(ValueError, match="'box_predictor' is not a known numeric detector option"):
        predict_detections([image], hostile)


def test_pretrained_classifier_weights_load_into_the_backbone(tmp_path):
    import timm

    from structvit.checkpoint import write_safetensors

    torch.manual_seed(1)
    classifier = timm.create_model("structvit_tiny", num_classes=10)
    path = str(tmp_path / "classifier.safetensors")
    write_safetensors(path, classifier.state_dict(), {"model": "structvit_tiny", "model_kwargs": "{}"})
    module = DetectionModule("structvit_tiny", num_classes=3, min_size=64, max_size=64, pretrained=path)
    body = module.model.backbone.body
    loaded = body.state_dict()
    for name, tensor in classifier.state_dict().items():
        if not name.startswith(("head.", "norm.")):
            assert torch.equal(loaded[name], tensor), name
    other = timm.create_model("structvit_tiny", embed_dims=(16, 32, 64, 128), head_dim=16)
    bad = str(tmp_path / "other.safetensors")
    write_safetensors(bad, other.state_dict(), {})
    with pytest.raises(ValueError, match="size mismatch in layer"):
        DetectionModule("structvit_tiny", num_classes=3, min_size=64, max_size=64, pretrained=bad)


def test_predict_segmentation_checkpoint(tmp_path):
    """`structvit predict IMAGE --checkpoint` with a Semantic FPN export: label PNG, JSON, overlay."""
    import json

    import numpy as np
    from PIL import Image

    from structvit.checkpoint import write_safetensors
    from structvit.dense.predict import predict_segmentation
    from structvit.engine.segmentation import SegmentationModule
    from structvit.predict import main as predict_main

    torch.manual_seed(0)
    module = SegmentationModule("structvit_tiny", num_classes=5, head_channels=32).eval()
    path = str(tmp_path / "seg.safetensors")
    write_safetensors(path, module.model.state_dict(), module.export_metadata())
    image = str(tmp_path / "scene.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(image)
    out = str(tmp_path / "out")
    assert predict_main([image, "--checkpoint", path, "--out", out, "--scale", "128", "64"]) == 0
    labels = np.asarray(Image.open(os.path.join(out, "scene_labels.png")))
    assert labels.shape == (48, 80) and labels.min() >= 1 and labels.max() <= 5
    with open(os.path.join(out, "scene.json")) as f:
        result = json.load(f)
    assert sum(c["fraction"] for c in result["classes"]) == pytest.approx(1.0, abs=1e-3)
    assert {c["label"] for c in result["classes"]} == set(np.unique(labels).tolist())
    with Image.open(os.path.join(out, "scene_overlay.png")) as im:
        assert im.size == (80, 48)
    # the labels are the model's own argmax at the requested scale, resized back
    from structvit.data.ade20k import SegEvalTransform

    x, _ = SegEvalTransform((128, 64))(torch.from_numpy(np.array(Image.open(image))).permute(2, 0, 1).float() / 255,
                                       torch.zeros(48, 80))
    with torch.no_grad():
        logits = torch.nn.functional.interpolate(module.model(x[None]), size=(48, 80), mode="bilinear",
                                                 align_corners=False)
    assert np.array_equal(labels, logits[0].argmax(0).numpy() + 1)
    with pytest.raises(ValueError, match="not a detection checkpoint"):
        from structvit.dense.predict import predict_detections
        predict_detections([image], path)
    assert predict_segmentation([str(tmp_path / "missing.png")], path)[0]["error"]
