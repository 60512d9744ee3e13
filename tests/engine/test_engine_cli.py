"""The `structvit fit|validate|test|predict` command: runs, checkpoints, exact resume after
SIGKILL, DDP on CPU, the paper's configs, one-line errors, and the training demo."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine_helpers import tiny_config
from structvit import cli, demo
from structvit.engine import load_weights

REPO = Path(__file__).resolve().parents[2]
# classification configs (the dense-prediction ones, coco_* and ade20k_*, are tested with their tasks)
CONFIGS = sorted(c for c in (REPO / "configs").glob("*.yaml") if not c.stem.startswith(("coco_", "ade20k_")))
TESTS = Path(__file__).resolve().parents[1]  # the helpers (engine_helpers, ...) live in tests/


pytestmark = pytest.mark.usefixtures("one_thread")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    env["PYTHONWARNINGS"] = "ignore"
    env["OMP_NUM_THREADS"] = "1"  # see _one_thread
    return env


def _structvit(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "structvit.cli", *map(str, args)], capture_output=True, text=True,
                          env=_env(), timeout=timeout, cwd=str(REPO))


# ------------------------------------------------------------------------------ a run
def test_fit_validate_test_predict_resume(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "tiny.yaml", root_dir=tmp_path / "run", max_steps=4, every=2)
    assert cli.main(["fit", "--config", cfg]) == 0
    ck = tmp_path / "run" / "checkpoints"
    for name in ("last.ckpt", "last.safetensors", "best.ckpt", "best.safetensors"):
        assert (ck / name).is_file(), name
    sd, meta = load_weights(str(ck / "last.safetensors"))
    assert meta["model"] == "structvit_tiny" and meta["step"] == "4" and "embed_dims" in meta["model_kwargs"]
    assert "seed_everything: 0" in meta["config"] and meta["classes"].startswith('["0"')
    assert "head.weight" in sd and not any(k.startswith("model.") for k in sd)
    logs = tmp_path / "run" / "logs" / "version_0"
    assert (logs / "config.yaml").is_file() and list(logs.glob("events.out.tfevents.*"))
    rows = list(csv.DictReader(open(logs / "metrics.csv")))
    cols = set(rows[0])
    assert {"train/loss_step", "train/lr", "train/acc1_step", "train/samples_per_sec", "val/acc1", "val/acc5"} <= cols
    assert any(r["train/samples_per_sec"] and float(r["train/samples_per_sec"]) > 0 for r in rows)

    assert cli.main(["validate", "--config", cfg, "--ckpt_path", "best"]) == 0
    assert cli.main(["test", "--config", cfg, "--ckpt_path", "last"]) == 0
    assert cli.main(["predict", "--config", cfg, "--ckpt_path", "last"]) == 0
    preds = list((tmp_path / "run" / "logs").glob("version_*/predictions.csv"))
    assert preds and len(list(csv.DictReader(open(preds[0])))) == 16
    # resume: the loops continue from step 4 up to 6
    assert cli.main(["fit", "--config", cfg, "--ckpt_path", "last", "--trainer.max_steps", "6"]) == 0
    _, meta = load_weights(str(ck / "last.safetensors"))
    assert meta["step"] == "6"


def test_fit_bf16_mixed_digits_config(tmp_path):
    """The shipped digits config for 2 steps in bf16 mixed precision (CPU autocast)."""
    rc = cli.main(["fit", "--config", str(REPO / "configs" / "digits_structvit_tiny.yaml"), "--trainer.max_steps", "2",
                   "--trainer.precision", "bf16-mixed", "--trainer.default_root_dir", str(tmp_path),
                   "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
    assert rc == 0
    sd, meta = load_weights(str(tmp_path / "checkpoints" / "last.safetensors"))
    assert meta["step"] == "2" and "bf16-mixed" in meta["config"]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


# ------------------------------------------------------------------------------ exact resume
def test_sigkill_and_resume_gives_the_same_weights(tmp_path):
    """8 steps over 3 epochs of 3 batches (mixup, drop path, random shifts), checkpoints every
    2 steps; killed after step 5 (resume from mid-epoch step 4) and after step 7 (resume from
    step 6, an epoch end): the final weights equal an uninterrupted run's bit for bit."""
    extra = "  limit_train_batches: 3\n"
    common = dict(max_steps=8, every=2)
    ref = tiny_config(tmp_path / "ref.yaml", root_dir=tmp_path / "ref", **common)
    run = tiny_config(tmp_path / "run.yaml", root_dir=tmp_path / "run", **common)
    for p in (ref, run):  # limit the epoch, add mixup
        text = Path(p).read_text().replace("  deterministic: true\n", "  deterministic: true\n" + extra)
        Path(p).write_text(text.replace("  warmup_steps: 2\n", "  warmup_steps: 2\n  mixup: 0.8\n  cutmix: 1.0\n"))
    kill = tmp_path / "kill{}.yaml"
    for s in (5, 7):
        Path(str(kill).format(s)).write_text(
            f"trainer:\n  callbacks:\n    - class_path: engine_helpers.KillAtStep\n      init_args: {{step: {s}}}\n")
    r = _structvit("fit", "--config", ref)
    assert r.returncode == 0, r.stderr[-2000:]
    r = _structvit("fit", "--config", run, "--config", str(kill).format(5))
    assert r.returncode == -9, r.stderr[-2000:]
    ck = tmp_path / "run" / "checkpoints"
    assert load_weights(str(ck / "last.safetensors"))[1]["step"] == "4"
    r = _structvit("fit", "--config", run, "--config", str(kill).format(7), "--ckpt_path", "last")
    assert r.returncode == -9, r.stderr[-2000:]
    assert load_weights(str(ck / "last.safetensors"))[1]["step"] == "6"
    r = _structvit("fit", "--config", run, "--ckpt_path", "last")
    assert r.returncode == 0, r.stderr[-2000:]
    a, ma = load_weights(str(tmp_path / "ref" / "checkpoints" / "last.safetensors"))
    b, mb = load_weights(str(ck / "last.safetensors"))
    assert ma["step"] == mb["step"] == "8"
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


# ------------------------------------------------------------------------------ DDP
VIT = """seed_everything: 0
trainer:
  default_root_dir: {root}
  accelerator: cpu
  devices: {devices}
  strategy: {strategy}
  max_steps: 3
  val_check_interval: 3
  check_val_every_n_epoch: null
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
  deterministic: true
model:
  model: vit_tiny_patch16_224
  model_kwargs: {{img_size: 32, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}}
  lr: 0.001
  warmup_steps: 1
data:
  class_path: structvit.data.ImageDataModule
  init_args: {{dataset: digits, batch_size: {batch}}}
"""


def test_ddp_two_processes_match_one_process(tmp_path):
    """A LayerNorm-only model (timm ViT), so that BatchNorm's per-process statistics do not
    enter: 2 gloo processes x batch 4 train and validate like 1 process x batch 8."""
    res = {}
    for name, devices, strategy, batch in (("one", 1, "auto", 8), ("ddp", 2, "ddp", 4)):
        p = tmp_path / f"{name}.yaml"
        p.write_text(VIT.format(root=tmp_path / name, devices=devices, strategy=strategy, batch=batch))
        r = _structvit("fit", "--config", p)
        assert r.returncode == 0, r.stderr[-3000:]
        res[name] = load_weights(str(tmp_path / name / "checkpoints" / "last.safetensors"))[0]
        rows = list(csv.DictReader(open(tmp_path / name / "logs" / "version_0" / "metrics.csv")))
        res[name + "_val"] = [(float(r["val/acc1"]), float(r["val/loss"])) for r in rows if r.get("val/acc1")]
    a, b = res["one"], res["ddp"]
    # equal up to float summation order (Adam magnifies that noise on zero-gradient entries such
    # as the key biases up to ~lr, hence atol well below the 3e-3 the weights move)
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=2e-5) for k in a)
    (acc1, loss1), = res["one_val"]  # the whole validation split (359 digits, no padding), synced
    (acc2, loss2), = res["ddp_val"]
    assert acc1 == pytest.approx(acc2, abs=1e-6) and loss1 == pytest.approx(loss2, rel=1e-4)
    assert acc1 > 0.0


# ------------------------------------------------------------------------------ configs
@pytest.fixture(scope="module")
def fake_roots(tmp_path_factory):
    from PIL import Image

    from structvit.data.fixtures import FIXTURE_WRITERS

    base = tmp_path_factory.mktemp("roots")
    roots = {}
    for name, writer in FIXTURE_WRITERS.items():
        roots[name] = base / name
        roots[name].mkdir()
        writer(str(roots[name]), frames=20, size=(32, 64))
    roots["imagenet"] = base / "imagenet"
    for split in ("train", "val"):
        for c in ("n01440764", "n01443537"):
            d = roots["imagenet"] / split / c
            d.mkdir(parents=True)
            Image.new("RGB", (40, 40), (10, 200, 30)).save(d / "a.JPEG")
    return roots


#: the paper's published number of each row a config reproduces (Table 2; Diving-48 top-1;
#: FineGym mean per-class accuracy), None where the paper publishes none (S on Diving/Gym)
PUBLISHED = {
    "imagenet": {"s_4_2": "82.9", "s_4_1": "83.2", "s_8_1": "83.3", "b_4_2": "84.0", "b_4_1": "84.2",
                 "b_8_1": "84.3", "l_4_1": "86.0"},
    "k400": {"s_4_2": "81.1", "s_4_1": "81.4", "s_8_1": "81.6", "b_4_2": "83.1", "b_4_1": "83.3"},
    "ssv1": {"s_4_2": "57.6", "s_4_1": "58.0", "s_8_1": "58.0", "b_4_2": "61.1", "b_4_1": "61.3"},
    "ssv2": {"s_4_2": "68.3", "s_4_1": "68.8", "s_8_1": "69.0", "b_4_2": "71.1", "b_4_1": "71.5"},
    "diving48": {"b_4_2": "87.8", "b_4_1": "88.3", "s_4_1": None},
    "gym99": {"b_4_2": "89.3", "b_4_1": "89.5", "s_4_1": None},
    "gym288": {"b_4_2": "53.8", "b_4_1": "54.2", "s_4_1": None},
}
PAPER_CONFIGS = [c for c in CONFIGS if "_structvit_" in c.stem and not c.stem.endswith("_tiny")]


def test_one_config_per_published_row():
    have = {c.stem for c in PAPER_CONFIGS}
    want = {f"{ds}_structvit_{tag}" for ds, rows in PUBLISHED.items() for tag in rows}
    assert have == want, (sorted(want - have), sorted(have - want))


def _check_paper_recipe(cfg: Path, c) -> None:
    """A config named <dataset>_structvit_<x>_<d>_<s> builds StructViT-X-D-S, names its row and
    number in its header, and follows the paper's recipe (Sec. 4.1)."""
    import yaml

    ds, tag = cfg.stem.split("_structvit_")
    size, d, stride = tag.split("_")
    header = "".join(ln for ln in cfg.read_text().splitlines(True) if ln.startswith("#"))
    assert "Reproduces" in header and f"StructViT-{size.upper()}-{d}-{stride}" in header
    number = PUBLISHED[ds][tag]
    assert (f"published {number} " in header) if number else ("no published number" in header)
    raw = yaml.safe_load(cfg.read_text())
    video = ds != "imagenet"
    assert raw["model"]["model"] == f"structvit_{tag}" + ("_video" if video else "")
    kwargs = raw["model"].get("model_kwargs") or {}
    assert set(kwargs) <= {"drop_path_rate"}, kwargs  # D, stride, size and frames come with the name
    structsa = [m for m in c.model.model.modules() if type(m).__name__ == "StructSA"]
    assert structsa and all(m.num_patterns == int(d) for m in structsa)
    assert tuple(c.model.model.kv_stride)[-2:] == (int(stride),) * 2  # key/value stride S (space)
    hp, trainer = c.datamodule.hparams, c.trainer
    glob_batch = 8 * hp.batch_size * trainer.accumulate_grad_batches  # the 8 GPUs the headers assume
    if not video:
        assert (trainer.max_epochs, c.model.hparams.lr, glob_batch, c.model.hparams.warmup_epochs) == (300, 1e-3, 1024, 5)
        assert hp.randaugment == "rand-m9-mstd0.5-inc1" and hp.random_erasing == 0.25
        assert (c.model.hparams.mixup, c.model.hparams.cutmix, c.model.hparams.label_smoothing) == (0.8, 1.0, 0.1)
        return
    frames = 16 if size == "s" else 32
    assert hp.num_frames == c.model.model.num_frames == frames
    assert (c.model.hparams.lr, glob_batch, kwargs.get("drop_path_rate")) == (2e-4, 64, 0.1)
    assert c.model.hparams.weight_decay == 0.05
    if ds == "k400":
        assert (trainer.max_epochs, c.model.hparams.warmup_epochs) == (110, 10)
        assert (hp.sampling, hp.flip, hp.crop, hp.num_clips, hp.num_crops) == ("dense", True, "random_resized", 4, 1)
        assert c.model.hparams.pretrained_inflate == "center"
    else:
        assert (trainer.max_epochs, c.model.hparams.warmup_epochs) == (60, 5)
        assert (hp.sampling, hp.flip, hp.num_clips, hp.num_crops) == ("segment", False, 1, 3)
        assert hp.crop == ("random_resized" if size == "b" else "center")  # random cropping only for B


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_parses_and_builds(cfg, fake_roots, tmp_path):
    """Every config parses with the CLI and builds its model and data module; the paper-sized
    models are built on the meta device (construction only, no memory, no forward)."""
    import contextlib

    import yaml

    from structvit.engine.cli import StructViTCLI

    raw = yaml.safe_load(cfg.read_text())
    ds = raw["data"]["init_args"]["dataset"]
    args = ["--config", str(cfg), "--trainer.default_root_dir", str(tmp_path)]
    if ds in fake_roots:
        args += ["--data.root", str(fake_roots[ds])]
    big = "tiny" not in raw["model"]["model"]
    with torch.device("meta") if big else contextlib.nullcontext():
        c = StructViTCLI(args=args, run=False)
    assert c.model.hparams.model == raw["model"]["model"]
    assert c.model.model.num_classes == c.datamodule.num_classes > 1
    assert c.trainer.max_epochs > 0 or c.trainer.max_steps > 0
    assert any(type(cb).__name__ == "StructViTCheckpoint" for cb in c.trainer.callbacks)
    kinds = {k for stage in c.model.model.block_kinds for k in stage} - {"conv"}
    if "_sa_" in cfg.stem:
        assert kinds == {"sa"}
    elif "convsa" in cfg.stem:
        assert kinds == {"convsa"}
    else:  # StructViT: StructSA in every attention block
        assert kinds == {"structsa"}
    if cfg in PAPER_CONFIGS:
        _check_paper_recipe(cfg, c)


def test_issue_command_on_fake_ssv2(fake_roots, tmp_path):
    r = _structvit("fit", "--config", "configs/ssv2_structvit_s_4_1.yaml", "--data.root", fake_roots["ssv2"],
                   "--model.model", "structvit_tiny_video", "--trainer.max_steps", "2",
                   "--trainer.default_root_dir", tmp_path, "--trainer.enable_progress_bar", "false")
    assert r.returncode == 0, r.stderr[-3000:]
    _, meta = load_weights(str(tmp_path / "checkpoints" / "last.safetensors"))
    assert meta["model"] == "structvit_tiny_video" and meta["step"] == "2" and "ssv2" in meta["config"]


# ------------------------------------------------------------------------------ errors
def _one_line_error(capsys, argv, *needles, code=None):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc != 0 and (code is None or rc == code)
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_bad_input_gives_one_line_errors(tmp_path, capsys, fake_roots):
    cfg = tiny_config(tmp_path / "tiny.yaml", root_dir=tmp_path / "run", max_steps=2, every=2)
    _one_line_error(capsys, ["fit", "--config", cfg, "--model.model", "nope"], "unknown model 'nope'",
                    "structvit_tiny_video")
    _one_line_error(capsys, ["fit", "--config", cfg, "--data.dataset", "mnist"], "mnist", "digits")
    _one_line_error(capsys, ["fit", "--config", cfg, "--model.frobnicate", "1"], "frobnicate", code=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(capsys, ["fit", "--config", str(REPO / "configs" / "ssv2_structvit_s_4_1.yaml"),
                             "--data.root", str(empty), "--trainer.default_root_dir", str(tmp_path / "e")], str(empty))
    # a checkpoint of another model
    assert cli.main(["fit", "--config", cfg]) == 0
    capsys.readouterr()
    _one_line_error(capsys, ["validate", "--config", cfg, "--model.model", "structvit_s_4_1",
                             "--model.model_kwargs", "{}", "--ckpt_path", "last"],
                    "structvit_tiny", "structvit_s_4_1")


# ------------------------------------------------------------------------------ demo
def test_demo_end_to_end_reduced(tmp_path, capsys):
    res = demo.run(tmp_path / "demo", digits_steps=3, video_steps=2, val_batches=1)
    out = capsys.readouterr().out
    assert "StructViT demo report" in out and "val top-1" in out and "total time" in out
    for name in ("digits", "moving_digits"):
        r = res["results"][name]
        assert r["steps"] > 0 and 0.0 <= r["metrics"]["val/acc1"] <= 1.0
        assert (r["checkpoints"] / "last.safetensors").is_file() and (r["checkpoints"] / "best.ckpt").is_file()
        assert (r["logs"] / "metrics.csv").is_file()
        assert str(r["checkpoints"]) in out
    assert res["figure_error"] is None and res["figures"] and all(p.is_file() for p in res["figures"])
    assert "figures" in out
