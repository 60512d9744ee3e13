"""Resuming `structvit fit`: exact after SIGKILL with a shipped config (max_epochs, EMA,
mixup, warmup in epochs), the schedule when the length changes, the bounded step
checkpoints, and a corrupt newest checkpoint."""
from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine_helpers import tiny_config
from structvit import cli
from structvit.engine import WarmupCosine, load_weights

REPO = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parents[1]  # the helpers (engine_helpers, ...) live in tests/

pytestmark = pytest.mark.usefixtures("one_thread")


def _structvit(*args, timeout=300):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "structvit.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=str(REPO))


def _kill_config(path: Path, step: int) -> str:
    path.write_text(f"trainer:\n  callbacks:\n    - class_path: engine_helpers.KillAtStep\n"
                    f"      init_args: {{step: {step}}}\n")
    return str(path)


def _same(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_sigkill_mid_epoch_resume_is_exact_with_max_epochs(tmp_path):
    """The shipped digits config (max_epochs, EMA, gradient clipping) with mixup and a warmup
    in epochs, made short: 3 epochs of 4 batches, checkpoints every 3 steps. Killed after step
    7 (the last checkpoint is step 6, batch 2 of epoch 1): the resumed run must continue epoch 1
    at batch 2, not replay it, and end with the weights and EMA of an uninterrupted run."""
    short = ["--config", "configs/digits_structvit_tiny.yaml", "--trainer.max_epochs", "3",
             "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "1", "--data.batch_size", "16",
             "--checkpoint.every_n_train_steps", "3", "--model.warmup_steps", "null", "--model.warmup_epochs", "1",
             "--model.mixup", "0.8", "--model.cutmix", "1.0", "--trainer.enable_progress_bar", "false",
             "--trainer.enable_model_summary", "false"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    r = _structvit("fit", *short, "--trainer.default_root_dir", ref)
    assert r.returncode == 0, r.stderr[-2000:]
    r = _structvit("fit", *short, "--trainer.default_root_dir", run, "--config", _kill_config(tmp_path / "k.yaml", 7))
    assert r.returncode == -9, r.stderr[-2000:]
    ck = run / "checkpoints"
    assert load_weights(str(ck / "last.safetensors"))[1]["step"] == "6"
    r = _structvit("fit", *short, "--trainer.default_root_dir", run, "--ckpt_path", "last")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "re-planning" not in r.stderr  # same length: the checkpoint's schedule goes on untouched
    for name in ("last.safetensors", "last.ema.safetensors"):
        a, ma = load_weights(str(ref / "checkpoints" / name))
        b, mb = load_weights(str(ck / name))
        assert ma["step"] == mb["step"] == "12"
        assert not _same(a, b), (name, _same(a, b)[:5])


def _lrs(root: Path) -> dict[int, float]:
    """step -> learning rate of that step, over every logged version of a run."""
    out = {}
    for f in sorted((root / "logs").glob("version_*/metrics.csv")):
        for row in csv.DictReader(open(f)):
            if row.get("train/lr"):
                out[int(row["step"])] = float(row["train/lr"])
    return out


@pytest.mark.parametrize("policy", ["replan", "keep"])
def test_resume_with_a_longer_run_warns_and_follows_the_policy(tmp_path, policy):
    cfg = tiny_config(tmp_path / "tiny.yaml", root_dir=tmp_path / "run", max_steps=4, every=2)
    text = Path(cfg).read_text().replace("  warmup_steps: 2\n", "  warmup_steps: 1\n  min_lr: 1.0e-5\n"
                                         f"  resume_schedule: {policy}\n")
    Path(cfg).write_text(text)
    assert cli.main(["fit", "--config", cfg]) == 0
    with pytest.warns(UserWarning, match="schedule ran 4 steps .* gives 8") as rec:
        assert cli.main(["fit", "--config", cfg, "--ckpt_path", "last", "--trainer.max_steps", "8"]) == 0
    assert any(("re-planning" if policy == "replan" else "keeping") in str(w.message) for w in rec)
    lrs = _lrs(tmp_path / "run")
    assert sorted(lrs) == list(range(8))
    old, new = WarmupCosine(4, 1, 1e-5 / 2e-3), WarmupCosine(8, 1, 1e-5 / 2e-3)
    want = {"replan": [2e-3 * old(s) for s in range(4)] + [2e-3 * new(s) for s in range(4, 8)],
            "keep": [2e-3 * old(s) for s in range(8)]}[policy]
    assert [lrs[s] for s in range(8)] == pytest.approx(want, rel=1e-6)
    if policy == "keep":
        assert lrs[7] == pytest.approx(1e-5)
    else:
        assert lrs[4] > 10 * 1e-5  # back on a cosine, not stuck at min_lr


def test_step_checkpoints_bounded_and_corrupt_last_named_with_the_previous(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "tiny.yaml", root_dir=tmp_path / "run", max_steps=10, every=2)
    assert cli.main(["fit", "--config", cfg]) == 0
    ck = tmp_path / "run" / "checkpoints"
    steps = sorted(p.name for p in ck.glob("step*.ckpt"))
    assert steps == ["step10.ckpt", "step6.ckpt", "step8.ckpt"]  # the newest 3 (cli.STEP_CHECKPOINTS_KEPT)
    assert sorted(p.name for p in ck.glob("step*.safetensors")) == ["step10.safetensors", "step6.safetensors",
                                                                   "step8.safetensors"]
    last = ck / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # truncated, as by a full disk
    os.utime(ck / "step8.ckpt", (1, 1))  # step10 is the newest of the others
    capsys.readouterr()
    rc = cli.main(["fit", "--config", cfg, "--ckpt_path", "last", "--trainer.max_steps", "12"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert str(last) in lines[0] and "corrupt or truncated" in lines[0]
    assert f"--ckpt_path {ck / 'step10.ckpt'}" in lines[0]
    # the named one continues the run
    assert cli.main(["fit", "--config", cfg, "--ckpt_path", str(ck / "step10.ckpt"),
                     "--trainer.max_steps", "12"]) == 0
    assert load_weights(str(ck / "last.safetensors"))[1]["step"] == "12"
    assert math.isfinite(float(load_weights(str(ck / "last.safetensors"))[0]["head.weight"].sum()))
