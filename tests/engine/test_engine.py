"""Engine pieces in process: optimiser groups, schedule, resumable loaders, the module on
built-in data (image and video; SA, ConvSA, StructSA), multi-view testing, mixup, EMA,
non-finite losses, safe weight loading."""
from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import timm
import torch

from engine_helpers import TINY_KWARGS, NaNAtStep
from structvit.data import ImageDataModule, VideoDataModule
from structvit.engine import (ClassificationModule, DeterministicData, NonFiniteLossError, ResumableLoader,
                              ShardedEvalLoader, StructViTCheckpoint, WarmupCosine, check_weights, load_weights,
                              param_groups, save_weights)

warnings.filterwarnings("ignore", ".*does not have many workers.*")


pytestmark = pytest.mark.usefixtures("one_thread")
VIDEO_KWARGS = dict(TINY_KWARGS, num_frames=4)


def _trainer(tmp_path, **kw):
    kw.setdefault("max_steps", 2)
    kw.setdefault("limit_val_batches", 1)
    kw.setdefault("limit_test_batches", 1)
    return L.Trainer(accelerator="cpu", devices=1, default_root_dir=str(tmp_path), logger=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     callbacks=kw.pop("callbacks", [DeterministicData()]),
                     enable_checkpointing=kw.pop("enable_checkpointing", False), **kw)


# ------------------------------------------------------------------------------ optimiser
def test_param_groups_exempt_norms_biases_pos_embed_and_patterns():
    m = ClassificationModule("structvit_tiny", TINY_KWARGS).model
    groups = param_groups(m, 0.05)
    decay, no_decay = groups[0]["names"], groups[1]["names"]
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert set(decay).isdisjoint(no_decay)
    assert len(decay) + len(no_decay) == len(list(m.parameters()))
    assert any(n.endswith(".attn.u_k") for n in no_decay) and any(n.endswith(".attn.u_v") for n in no_decay)
    assert any(".pos_embed." in n for n in no_decay)
    assert any(n.endswith("norm1.weight") for n in no_decay) and any(n.endswith(".bias") for n in no_decay)
    assert "head.weight" in decay and any(n.endswith("attn.qkv.weight") for n in decay)
    assert not any(".pos_embed." in n or n.endswith(".bias") for n in decay)


def test_warmup_cosine_schedule():
    f = WarmupCosine(total_steps=100, warmup_steps=10, min_ratio=0.01)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    vals = [f(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))  # non-increasing after warmup
    assert f(55) == pytest.approx(0.01 + 0.99 * 0.5)  # half way down the cosine
    assert f(100) == pytest.approx(0.01) and f(1000) == pytest.approx(0.01)
    with pytest.raises(ValueError):
        WarmupCosine(10, 20)


def test_lr_follows_schedule_per_step(tmp_path):
    m = ClassificationModule("structvit_tiny", TINY_KWARGS, lr=1e-3, warmup_steps=4, min_lr=0.0)
    lrs = []

    class Rec(L.Callback):
        def on_train_batch_start(self, trainer, *a):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    _trainer(tmp_path, max_steps=6, callbacks=[DeterministicData(), Rec()], limit_val_batches=0).fit(
        m, ImageDataModule(batch_size=8))
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4:] == pytest.approx([1e-3, 1e-3 * 0.5 * (1 + math.cos(math.pi * 1 / 2))])  # then cosine to 0


# ------------------------------------------------------------------------------ mixed precision
@pytest.mark.parametrize("name,shape", [("structvit_tiny", (8, 3, 32, 32)), ("structvit_tiny_video", (4, 3, 4, 32, 32))],
                         ids=["image", "video"])
def test_bf16_autocast_forward_backward_close_to_float32(name, shape):
    """The tiny models (StructSA in every attention block) in training mode under CPU bf16
    autocast: the loss, the logits and the gradients (incl. the patterns') follow float32's."""
    torch.manual_seed(0)
    kw = {"num_frames": shape[2]} if len(shape) == 5 else {}
    model = timm.create_model(name, num_classes=10, **kw).train()
    x, y = torch.randn(shape), torch.arange(shape[0]) % 10

    def run(autocast):
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout and drop-path draws in both runs
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        loss = torch.nn.functional.cross_entropy(out.float(), y)
        loss.backward()
        return out, loss, {n: p.grad.clone() for n, p in model.named_parameters()}

    out32, loss32, g32 = run(False)
    out16, loss16, g16 = run(True)
    assert out16.dtype == torch.bfloat16 and out32.dtype == torch.float32  # autocast did run
    assert float(loss16) == pytest.approx(float(loss32), rel=1e-2)
    assert (out16.float() - out32).abs().max() <= 3e-2 * out32.abs().max()
    flat32, flat16 = (torch.cat([g[n].flatten() for n in g32]) for g in (g32, g16))
    assert torch.isfinite(flat16).all()
    assert torch.nn.functional.cosine_similarity(flat32, flat16, 0) > 0.99
    patterns = [n for n in g32 if n.endswith((".u_k", ".u_v"))]
    assert patterns and all(g16[n].dtype == torch.float32 for n in patterns)  # float32 master weights
    pk32, pk16 = (torch.cat([g[n].flatten() for n in patterns]) for g in (g32, g16))
    assert torch.nn.functional.cosine_similarity(pk32, pk16, 0) > 0.98


# ------------------------------------------------------------------------------ loaders
def _digits_loader(batch_size=8):
    dm = ImageDataModule(batch_size=batch_size)
    dm.setup("fit")
    return dm.train_dataloader()  # digits with random-shift augmentation, drop_last


def test_resumable_loader_continues_where_it_stopped():
    full = ResumableLoader(_digits_loader(), seed=3)
    it = iter(full)
    ref = [next(it) for _ in range(5)]
    part = ResumableLoader(_digits_loader(), seed=3)
    it = iter(part)
    [next(it) for _ in range(2)]
    state = part.state_dict()
    assert state == {"epoch": 0, "batches": 2, "seed": 3}
    resumed = ResumableLoader(_digits_loader(), seed=3)
    resumed.load_state_dict(state)
    it = iter(resumed)
    for want in ref[2:5]:  # same samples, same augmentation draws
        got = next(it)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    other = next(iter(ResumableLoader(_digits_loader(), seed=4)))
    assert not torch.equal(other[0], ref[0][0])


def test_resumable_loader_epochs_and_process_shards():
    single = ResumableLoader(_digits_loader(8), seed=0)
    ranks = [ResumableLoader(_digits_loader(4), seed=0, rank=r, world=2) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1])
    b1 = next(iter(single))
    b_r = [next(iter(r)) for r in ranks]
    # one process with batch 8 and two with batch 4 see the same global batch, same augmentation
    assert torch.equal(torch.cat([b[0] for b in b_r]), b1[0]) and torch.equal(torch.cat([b[1] for b in b_r]), b1[1])
    # a new epoch is another permutation
    loader = ResumableLoader(_digits_loader(256), seed=0)
    e0 = torch.cat([y for _, y in loader])
    e1 = torch.cat([y for _, y in loader])
    assert loader.epoch == 1 and len(e0) == len(e1) == 256 * len(loader) and not torch.equal(e0, e1)


def test_sharded_eval_loader_covers_every_sample_once():
    dm = ImageDataModule(batch_size=16)
    dm.setup("validate")
    dl = dm.val_dataloader()
    shards = [ShardedEvalLoader(dl, r, 3) for r in range(3)]
    idx = sum((s.indices for s in shards), [])
    assert idx == list(range(len(dl.dataset)))  # 359 samples: no padding, no repeats
    assert torch.cat([y for s in shards for _, y in s]).tolist() == torch.cat([y for _, y in dl]).tolist()


# ------------------------------------------------------------------------------ module
@pytest.mark.parametrize("video", [False, True], ids=["image", "video"])
@pytest.mark.parametrize("kind", ["sa", "convsa", "structsa"])
def test_fit_validate_test_on_builtin_data(tmp_path, kind, video):
    kw = dict(VIDEO_KWARGS if video else TINY_KWARGS)
    kw.update({"sa": dict(struct_blocks=(0, 0)), "convsa": dict(attention="convsa"),
               "structsa": dict(attention="structsa")}[kind])
    name = "structvit_tiny_video" if video else "structvit_tiny"
    m = ClassificationModule(name, kw, lr=1e-3, warmup_steps=1, ema_decay=0.9)
    kinds = {k for stage in m.model.block_kinds for k in stage}
    assert kinds == {"conv", kind}
    dm = VideoDataModule(batch_size=4, num_frames=4) if video else ImageDataModule(batch_size=8)
    trainer = _trainer(tmp_path)
    before = {k: v.clone() for k, v in m.model.state_dict().items()}
    trainer.fit(m, dm)
    assert trainer.global_step == 2
    assert any(not torch.equal(before[k], v) for k, v in m.model.state_dict().items())  # it trained
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    val = trainer.validate(m, dm, verbose=False)[0]
    test = trainer.test(m, dm, verbose=False)[0]
    for res, p in ((val, "val"), (test, "test")):
        assert {f"{p}/acc1", f"{p}/acc5", f"{p}/ema_acc1", f"{p}/loss"} <= set(res)
        assert 0.0 <= res[f"{p}/acc1"] <= res[f"{p}/acc5"] <= 1.0


def test_multiview_test_averages_softmax_of_views(tmp_path):
    m = ClassificationModule("structvit_tiny_video", VIDEO_KWARGS).eval()
    x = torch.randn(2, 3, 3, 4, 32, 32)  # (B, V, C, T, H, W)
    with torch.no_grad():
        scores = m._views_forward(m.model, x)
        per_view = torch.stack([m.model(x[:, v]).softmax(-1) for v in range(3)], 1).mean(1)
    torch.testing.assert_close(scores.exp(), per_view, rtol=1e-5, atol=1e-6)
    # end to end: 2 clips x 1 crop per video
    dm = VideoDataModule(batch_size=4, num_frames=4, num_clips=2)
    dm.setup("test")
    assert next(iter(dm.test_dataloader()))[0].shape[1] == 2
    res = _trainer(tmp_path).test(m, dm, verbose=False)[0]
    assert 0.0 <= res["test/acc1"] <= 1.0


def test_mixup_cutmix_on_video_and_label_smoothing():
    m = ClassificationModule("structvit_tiny_video", VIDEO_KWARGS, mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    x = torch.randn(4, 3, 4, 32, 32)
    y = torch.tensor([0, 1, 2, 3])
    xm, t = m.mixup_fn(x.flatten(1, 2), y)
    assert xm.shape == (4, 12, 32, 32) and t.shape == (4, 10)
    torch.testing.assert_close(t.sum(1), torch.ones(4))
    assert (t.max(1).values < 0.95).all()  # smoothed and mixed


def test_ema_tracks_weights(tmp_path):
    m = ClassificationModule("structvit_tiny", TINY_KWARGS, lr=1e-2, ema_decay=0.5, ema_warmup=False)
    start = {k: v.clone() for k, v in m.model.state_dict().items()}
    _trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(m, ImageDataModule(batch_size=8))
    assert int(m.ema_updates) == 3
    name = "head.weight"
    ema, cur, init = m.ema_model.state_dict()[name], m.model.state_dict()[name], start[name]
    assert not torch.equal(ema, cur) and not torch.equal(ema, init)
    assert all(not p.requires_grad for p in m.ema_model.parameters())


def test_nonfinite_loss_stops_naming_the_step(tmp_path):
    m = ClassificationModule("structvit_tiny", TINY_KWARGS)
    ck = StructViTCheckpoint(dirpath=str(tmp_path / "ck"), save_last=True, save_top_k=0, every_n_train_steps=2)
    trainer = _trainer(tmp_path, max_steps=6, callbacks=[DeterministicData(), NaNAtStep(3), ck],
                       enable_checkpointing=True, limit_val_batches=0)
    with pytest.raises(NonFiniteLossError, match="at step 3"):
        trainer.fit(m, ImageDataModule(batch_size=8))
    sd, meta = load_weights(str(tmp_path / "ck" / "last.safetensors"))
    assert meta["step"] == "2"  # the last good checkpoint is kept, nothing written after the failure
    assert all(torch.isfinite(v).all() for v in sd.values())


def _full_state(m) -> dict:
    """Every tensor of the module: parameters, buffers (BatchNorm statistics), EMA and its counter."""
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_nonfinite_loss_skip_leaves_no_trace(tmp_path):
    """A NaN batch at step 1 with BatchNorm in the conv stages and an EMA: the module is bit for
    bit as before that batch, nothing non-finite anywhere (module, last/best/EMA exports), and
    the model still evaluates to finite losses."""
    m = ClassificationModule("structvit_tiny", TINY_KWARGS, nonfinite_loss="skip", ema_decay=0.9)
    assert any(isinstance(x, torch.nn.BatchNorm2d) for x in m.model.modules())
    states = {}

    class Record(L.Callback):  # runs after NaNAtStep's poisoning, around the skipped step
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 1:
                states["before"] = _full_state(pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                states["after"] = _full_state(pl_module)

    ck = StructViTCheckpoint(dirpath=str(tmp_path / "ck"), save_last=True, save_top_k=0, every_n_train_steps=2)
    best = StructViTCheckpoint(dirpath=str(tmp_path / "ck"), filename="best", monitor="val/acc1", mode="max")
    trainer = _trainer(tmp_path, max_steps=4, callbacks=[DeterministicData(), NaNAtStep(1), Record(), ck, best],
                       enable_checkpointing=True, val_check_interval=2, check_val_every_n_epoch=None)
    with pytest.warns(RuntimeWarning, match="non-finite loss .* at step 1"):
        trainer.fit(m, ImageDataModule(batch_size=8))
    assert trainer.global_step == 4
    before, after = states["before"], states["after"]
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed[:5]  # running stats, num_batches_tracked, weights, EMA, ema_updates
    bad = [k for k, v in m.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert not bad, bad[:5]
    for name in ("last", "last.ema", "best", "best.ema"):
        sd, _ = load_weights(str(tmp_path / "ck" / f"{name}.safetensors"))
        assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point()), name
    res = trainer.validate(m, ImageDataModule(batch_size=8), verbose=False)[0]
    assert math.isfinite(res["val/loss"]) and math.isfinite(res["val/ema_loss"])


def test_module_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown model 'nope'.*structvit_tiny"):
        ClassificationModule("nope")
    with pytest.raises(ValueError, match="nonfinite_loss"):
        ClassificationModule("structvit_tiny", TINY_KWARGS, nonfinite_loss="ignore")
    m = ClassificationModule("structvit_tiny", TINY_KWARGS)
    with pytest.raises(ValueError, match="image model.*structvit_tiny_video"):
        m.training_step((torch.randn(2, 3, 4, 32, 32), torch.tensor([0, 1])), 0)


def test_weights_are_never_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "obj": Evil()}, bad)
    with pytest.raises(ValueError, match="weights only"):
        load_weights(str(bad))
    good = tmp_path / "w.safetensors"
    save_weights(str(good), {"a": torch.arange(3.0)}, {"model": "structvit_tiny"})
    sd, meta = load_weights(str(good))
    assert torch.equal(sd["a"], torch.arange(3.0)) and meta["model"] == "structvit_tiny"


def test_pretrained_image_weights_inflate_into_video_model(tmp_path):
    img = ClassificationModule("structvit_tiny", TINY_KWARGS, num_classes=10)
    path = tmp_path / "img.safetensors"
    save_weights(str(path), img.model.state_dict(), {"model": "structvit_tiny"})
    vid = ClassificationModule("structvit_tiny_video", VIDEO_KWARGS, num_classes=7, pretrained=str(path),
                               pretrained_inflate="center", pretrained_ignore_head=True)
    w2 = img.model.state_dict()["blocks3.0.attn.qkv.weight"]
    assert torch.equal(vid.model.state_dict()["blocks3.0.attn.qkv.weight"], w2)
    k3 = vid.model.state_dict()["blocks1.0.pos_embed.weight"]  # (C, 1, 3, 3, 3), centre frame = 2-D kernel
    assert torch.equal(k3[:, :, 1], img.model.state_dict()["blocks1.0.pos_embed.weight"])
    assert vid.model.head.out_features == 7
    with pytest.raises(ValueError, match="pretrained_inflate"):
        ClassificationModule("structvit_tiny_video", VIDEO_KWARGS, pretrained=str(path))


def test_weights_of_another_dtype_are_cast_bad_ones_refused_naming_tensor_and_file(tmp_path):
    ref = ClassificationModule("structvit_tiny", TINY_KWARGS)
    sd = ref.model.state_dict()
    half = tmp_path / "half.safetensors"
    save_weights(str(half), {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()})
    with pytest.warns(UserWarning, match=r"tensors in .*half.safetensors cast to the model's dtype \(float16 -> float32"):
        m = ClassificationModule("structvit_tiny", TINY_KWARGS, pretrained=str(half))
    got = m.model.state_dict()
    assert all(got[k].dtype == v.dtype and torch.equal(got[k], v.half().to(v.dtype) if v.is_floating_point() else v)
               for k, v in sd.items())
    for name, bad, match in (("nan", {**sd, "head.weight": sd["head.weight"].clone().fill_(math.nan)},
                              r"tensor 'head.weight' in .*nan.safetensors has \d+ non-finite"),
                             ("int", {**sd, "head.weight": sd["head.weight"].long()},
                              r"tensor 'head.weight' in .*int.safetensors is int64, the model's is float32")):
        path = tmp_path / f"{name}.safetensors"
        save_weights(str(path), bad)
        with pytest.raises(ValueError, match=match):
            ClassificationModule("structvit_tiny", TINY_KWARGS, pretrained=str(path))
    # integer buffers stay integers; names the model lacks pass through
    out = check_weights({"x.num_batches_tracked": torch.tensor(3), "other": torch.ones(1, dtype=torch.float64)},
                        {"x.num_batches_tracked": torch.tensor(0)})
    assert out["x.num_batches_tracked"].dtype == torch.long and out["other"].dtype == torch.float64


def test_malformed_weights_files_named_in_one_line(tmp_path, capsys):
    from structvit import convert
    from structvit.viz import cli as viz_cli

    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match=r"broken.safetensors is not a readable safetensors file"):
        load_weights(str(bad))
    trunc = tmp_path / "trunc.pth"
    torch.save({"w": torch.zeros(100)}, trunc)
    trunc.write_bytes(trunc.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"trunc.pth is not a readable torch file"):
        load_weights(str(trunc))
    with pytest.raises(ValueError, match="broken.safetensors"):
        ClassificationModule("structvit_tiny", TINY_KWARGS, pretrained=str(bad))
    capsys.readouterr()
    for run in (lambda: viz_cli.main(["kernels", "--checkpoint", str(bad), "--model", "structvit_tiny",
                                      "--out", str(tmp_path / "figs")]),
                lambda: convert.main([str(bad), str(tmp_path / "out.safetensors"), "--model", "structvit_tiny"])):
        assert run() != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "broken.safetensors" in err[0] and "Traceback" not in err[0], err


@pytest.mark.parametrize("name,shape", [("structvit_tiny", (0, 3, 32, 32)), ("structvit_tiny_video", (0, 3, 4, 32, 32)),
                                        ("structvit_deit_tiny", (0, 3, 32, 32))])
def test_empty_batch_gives_an_empty_result(name, shape):
    kw = dict(TINY_KWARGS, num_frames=4) if "video" in name else dict(TINY_KWARGS) if "deit" not in name \
        else {"img_size": 32}
    m = ClassificationModule(name, kw)
    for train in (True, False):
        m.train(train)
        with torch.no_grad():
            assert m(torch.randn(shape)).shape == (0, 10)
