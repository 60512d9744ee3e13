"""`structvit fit|validate` against bad checkpoints and failing disks: every checkpoint
argument checked before Lightning loads it, one line naming the file (and the newest
loadable one), a full or read-only disk reported in one line naming the path, the previous
checkpoint intact; the traceback setting of structvit.config honoured."""
from __future__ import annotations

import os
import subprocess

import pytest
import torch
from engine_helpers import FullDiskFile, tiny_config

from structvit import checkpoint as ck
from structvit import config
from structvit.engine import cli

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 4-step run with step2, step4 and last checkpoints."""
    root = tmp_path_factory.mktemp("run")
    cfg = tiny_config(root / "tiny.yaml", root_dir=root / "run", max_steps=4, every=2)
    assert cli.main(["fit", "--config", cfg]) == 0
    return root / "run" / "checkpoints", cfg


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_truncated_ckpt_path_file_is_named_with_the_newest_loadable(run, tmp_path, capsys, subcommand):
    ckpts, cfg = run
    bad = tmp_path / "step4.ckpt"
    data = (ckpts / "step4.ckpt").read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    good = tmp_path / "step2.ckpt"
    good.write_bytes((ckpts / "step2.ckpt").read_bytes())
    capsys.readouterr()
    rc = cli.main([subcommand, "--config", cfg, "--ckpt_path", str(bad)])
    line = _one_error_line(capsys)
    assert rc == 1 and str(bad) in line and "corrupt or truncated" in line, line
    assert f"--ckpt_path {good}" in line


def test_hostile_hyper_parameters_never_reach_the_model(run, tmp_path, capsys, monkeypatch):
    ckpts, cfg = run
    obj = torch.load(ckpts / "last.ckpt", weights_only=True)
    obj["hyper_parameters"]["model_kwargs"] = dict(obj["hyper_parameters"]["model_kwargs"],
                                                   pretrained_cfg_overlay={"file": "/etc/passwd"})
    hostile = tmp_path / "hostile.ckpt"
    torch.save(obj, hostile)
    import timm

    def create_model(*args, **kwargs):
        raise AssertionError(f"timm.create_model reached with {kwargs}")

    monkeypatch.setattr(timm, "create_model", create_model)
    capsys.readouterr()
    assert cli.main(["validate", "--config", cfg, "--ckpt_path", str(hostile)]) == 1
    line = _one_error_line(capsys)
    assert "hostile.ckpt" in line and "pretrained_cfg_overlay" in line, line


def test_full_disk_during_fit_keeps_the_last_checkpoint(run, tmp_path, capsys, monkeypatch):
    ckpts, cfg = run
    root = tmp_path / "copy"
    (root / "checkpoints").mkdir(parents=True)
    for p in ckpts.iterdir():
        (root / "checkpoints" / p.name).write_bytes(p.read_bytes())
    before = {p.name: p.read_bytes() for p in (root / "checkpoints").iterdir()}
    monkeypatch.setattr(ck, "open", FullDiskFile, raising=False)  # the checkpoint writer's open()
    capsys.readouterr()
    rc = cli.main(["fit", "--config", cfg, "--trainer.default_root_dir", str(root), "--ckpt_path", "last",
                   "--trainer.max_steps", "6"])
    line = _one_error_line(capsys)
    assert rc == 1 and f"cannot write {root / 'checkpoints'}" in line and "No space left on device" in line, line
    after = {p.name: p.read_bytes() for p in (root / "checkpoints").iterdir()}
    assert after == before  # no partial step6.ckpt, no temporary file, last.ckpt untouched
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


def test_read_only_run_folder_is_one_line(run, tmp_path, capsys):
    """A read-only filesystem (a tmpfs mounted read-only: needs root; skipped otherwise)."""
    ckpts, cfg = run
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        capsys.readouterr()
        rc = cli.main(["fit", "--config", cfg, "--trainer.default_root_dir", str(mnt / "run")])
        line = _one_error_line(capsys)
        assert rc == 1 and "Read-only file system" in line and str(mnt) in line, line
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_traceback_setting_is_honoured(run, tmp_path, capsys):
    _, cfg = run
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    assert cli.main(["validate", "--config", cfg, "--ckpt_path", str(bad)]) == 1
    config.set_traceback(True)
    try:
        with pytest.raises(ck.CheckpointError, match="bad.ckpt"):
            cli.main(["validate", "--config", cfg, "--ckpt_path", str(bad)])
    finally:
        config.reload_from_environment()
