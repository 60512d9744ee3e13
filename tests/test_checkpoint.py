"""structvit.checkpoint: the one reader (every format, wrapper keys, weights only), the
metadata schema against hostile files, atomic writes under failing disks, and the one
model-name check used by every command."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
import torch
from engine_helpers import TINY_KWARGS, FullDiskFile

from structvit import checkpoint as ck
from structvit.models import check_model_name, project_model_names

IMAGE_PRE = {"kind": "image", "dataset": "digits", "input_size": 32, "mean": [0.5, 0.5, 0.5],
             "std": [0.25, 0.25, 0.25], "resize": "full", "interpolation": "bilinear", "crop_pct": 1.0}


@pytest.fixture(scope="module")
def tiny_sd():
    import timm

    torch.manual_seed(0)
    return timm.create_model("structvit_tiny", num_classes=10, **TINY_KWARGS).state_dict()


def _export(path, sd, **meta):
    base = {"model": "structvit_tiny", "model_kwargs": json.dumps(TINY_KWARGS), "num_classes": "10",
            "preprocessing": json.dumps(IMAGE_PRE)}
    base.update(meta)
    ck.write_safetensors(path, sd, {k: v for k, v in base.items() if v is not None})
    return str(path)


# ------------------------------------------------------------------------------ reading
def test_every_format_reads_to_the_same_tensors(tmp_path, tiny_sd):
    st = _export(tmp_path / "m.safetensors", tiny_sd)
    lightning = tmp_path / "run.ckpt"
    torch.save({"state_dict": {**{f"model.{k}": v for k, v in tiny_sd.items()},
                               **{f"ema_model.{k}": v + 1 for k, v in tiny_sd.items() if v.is_floating_point()}},
                "hyper_parameters": {"model": "structvit_tiny", "model_kwargs": TINY_KWARGS, "num_classes": 10},
                "structvit": {"classes": [str(i) for i in range(10)], "preprocessing": IMAGE_PRE},
                "epoch": 3}, lightning)
    uniformer = tmp_path / "uniformer.pth"
    torch.save({"model": {f"module.{k}": v for k, v in tiny_sd.items()}, "epoch": 300}, uniformer)
    video = tmp_path / "uniformer_video.pyth"
    torch.save({"model_state": dict(tiny_sd)}, video)
    for path, fmt in ((st, "safetensors"), (lightning, "lightning"), (uniformer, "state_dict"),
                      (video, "state_dict")):
        c = ck.read_checkpoint(path)
        assert c.format == fmt and set(c.state_dict) == set(tiny_sd), path
        assert all(torch.equal(c.state_dict[k], v) for k, v in tiny_sd.items())
        assert c.num_classes == 10
    for path in (st, lightning):
        c = ck.read_checkpoint(path)
        assert c.model == "structvit_tiny" and c.preprocessing == IMAGE_PRE
        assert c.model_kwargs == {k: tuple(v) if isinstance(v, list) else v for k, v in TINY_KWARGS.items()}


def test_torch_files_are_never_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    bad = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "obj": Evil()}, bad)
    with pytest.raises(ck.CheckpointError, match="evil.pth.*weights only"):
        ck.read_checkpoint(bad)
    assert not (tmp_path / "pwned").exists()
    trunc = tmp_path / "trunc.ckpt"
    torch.save({"state_dict": {"model.a": torch.zeros(1000)}}, trunc)
    trunc.write_bytes(trunc.read_bytes()[:300])
    with pytest.raises(ck.CheckpointError, match="trunc.ckpt"):
        ck.read_checkpoint(trunc)


# ------------------------------------------------------------------------------ hostile metadata
HOSTILE = [
    ({"model": "hf-hub:evil/model"}, "'model'.*unknown model"),
    ({"model": "../../etc/passwd"}, "'model'.*unknown model"),
    ({"model": "structvit_tiny.in1k"}, "'model'.*unknown model"),
    ({"model_kwargs": json.dumps({"pretrained": True})}, "'model_kwargs'.*'pretrained'"),
    ({"model_kwargs": json.dumps({"pretrained_cfg_overlay": {"file": "/etc/passwd"}})}, "pretrained_cfg_overlay"),
    ({"model_kwargs": json.dumps({"checkpoint_path": "/tmp/x.pth"})}, "checkpoint_path"),
    ({"model_kwargs": json.dumps({"not_an_option": 1})}, "not_an_option"),
    ({"model_kwargs": json.dumps({"attention": "file:///etc/passwd"})}, "attention=.*not a plain value"),
    ({"model_kwargs": json.dumps({"depths": [1, 1, {"a": 1}, 1]})}, "depths=.*not a plain value"),
    ({"model_kwargs": "{not json"}, "'model_kwargs' is not valid JSON"),
    ({"model_kwargs": json.dumps(["a"])}, "'model_kwargs' must be a mapping"),
    ({"preprocessing": json.dumps(dict(IMAGE_PRE, input_size=-3))}, "'preprocessing'.*'input_size'"),
    ({"preprocessing": json.dumps(dict(IMAGE_PRE, mean="/etc/passwd"))}, "'preprocessing'.*'mean'"),
    ({"preprocessing": json.dumps(dict(IMAGE_PRE, std=[0.0, 1.0, 1.0]))}, "'preprocessing'.*'std'"),
    ({"preprocessing": json.dumps(dict(IMAGE_PRE, loader="pickle"))}, "'preprocessing'.*unknown entry 'loader'"),
    ({"preprocessing": json.dumps({"kind": "video", "input_size": 32})}, "'preprocessing'.*missing"),
    ({"num_classes": "many"}, "'num_classes'"),
    ({"classes": json.dumps({"a": 1})}, "'classes'"),
]


@pytest.mark.parametrize("meta, match", HOSTILE)
def test_hostile_metadata_is_the_checkpoints_fault(tmp_path, tiny_sd, meta, match, monkeypatch):
    import timm

    path = _export(tmp_path / "hostile.safetensors", tiny_sd, **meta)
    with pytest.raises(ck.CheckpointError, match=f"hostile.safetensors.*{match}"):
        ck.read_checkpoint(path)

    # no command lets it reach timm or the hub, and none blames the input
    def create_model(*args, **kwargs):
        raise AssertionError(f"timm.create_model reached with {args} {kwargs}")

    monkeypatch.setattr(timm, "create_model", create_model)
    from structvit.predict import PredictError, Predictor
    from structvit.viz import cli as viz_cli

    with pytest.raises(PredictError, match=f"--checkpoint .*hostile.safetensors.*{match}"):
        Predictor(path)
    with pytest.raises(viz_cli.ArgumentError, match=f"--checkpoint.*hostile.safetensors.*{match}"):
        viz_cli.load_model(None, path)


def test_hostile_lightning_hyper_parameters(tmp_path, tiny_sd):
    path = tmp_path / "hp.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in tiny_sd.items()},
                "hyper_parameters": {"model": "structvit_tiny",
                                     "model_kwargs": {"pretrained_cfg_overlay": {"url": "http://x"}}}}, path)
    with pytest.raises(ck.CheckpointError, match="hp.ckpt.*pretrained_cfg_overlay"):
        ck.read_checkpoint(path)


def test_predict_reports_bad_preprocessing_as_the_checkpoints(tmp_path, tiny_sd, capsys):
    from PIL import Image

    from structvit.predict import main

    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    path = _export(tmp_path / "bad.safetensors", tiny_sd, preprocessing=json.dumps(dict(IMAGE_PRE, input_size=0)))
    rc = main([str(tmp_path / "x.png"), "--checkpoint", path])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.safetensors" in err and "'input_size'" in err and "x.png" not in err, err


def test_legacy_convert_metadata_still_reads(tmp_path, tiny_sd):
    # `structvit convert` wrote the options as top-level Python literals
    path = tmp_path / "conv.safetensors"
    ck.write_safetensors(path, tiny_sd, {"model": "structvit_tiny", "struct_blocks": "(4, 1)", "num_classes": "10",
                                         "attention": "structsa", "exact": "True", "source": "/any/path.pth"})
    c = ck.read_checkpoint(path)
    assert c.model_kwargs == {"struct_blocks": (4, 1), "attention": "structsa"} and c.num_classes == 10


# ------------------------------------------------------------------------------ atomic writes
def test_full_disk_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    from structvit.engine.callbacks import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    last = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.arange(4.0)}, last)
    before = last.read_bytes()
    monkeypatch.setattr(ck, "open", FullDiskFile, raising=False)  # the checkpoint writer's own open()
    with pytest.raises(ck.CheckpointWriteError, match=f"cannot write {last}: No space left on device") as info:
        io.save_checkpoint({"step": 2, "w": torch.arange(8.0)}, last)
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(OSError):
        io.save_checkpoint({"step": 2}, tmp_path / "step2.ckpt")
    monkeypatch.undo()
    assert last.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["last.ckpt"]
    assert torch.load(last, weights_only=True)["step"] == 1


def test_safetensors_export_failing_mid_write(tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "last.safetensors"
    ck.write_safetensors(path, {"a": torch.zeros(3)}, {"step": "1"})
    before = path.read_bytes()

    def save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(ck.CheckpointWriteError, match=f"cannot write {path}"):
        ck.write_safetensors(path, {"a": torch.ones(3)}, {"step": "2"})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.safetensors"]


def test_checkpoint_is_staged_in_its_own_folder_not_tmpdir(tmp_path, monkeypatch):
    """Lightning stages a checkpoint in $TMPDIR and copies it across filesystems; ours is
    written next to its final name and renamed."""
    from structvit.engine.callbacks import AtomicCheckpointIO

    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr("tempfile.tempdir", str(tmpdir))
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renames.append((a, b)), real_replace(a, b))[1])
    run = tmp_path / "run" / "checkpoints"
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(2)}, run / "last.ckpt")
    assert os.listdir(tmpdir) == []
    assert len(renames) == 1 and os.path.dirname(renames[0][0]) == str(run)
    assert os.listdir(run) == ["last.ckpt"]


_KILLED_MID_SAVE = """
import os, signal, sys, torch
from structvit import checkpoint as ck

class Dying:  # writes half of the file, then the process is killed (no cleanup runs)
    def __init__(self, path, mode="r"):
        self.f = open(path, mode)
    def write(self, data):
        data = memoryview(data).cast("B")
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.f.close()

ck.open = Dying
ck.save_torch({"step": 2, "w": torch.zeros(1 << 16)}, sys.argv[1])
"""


def test_kill_during_save_leaves_the_previous_checkpoint(tmp_path):
    last = tmp_path / "last.ckpt"
    ck.save_torch({"step": 1, "w": torch.ones(4)}, last)
    before = last.read_bytes()
    r = subprocess.run([sys.executable, "-c", _KILLED_MID_SAVE, str(last)], capture_output=True, timeout=300)
    assert r.returncode == -9, r.stderr.decode()[-2000:]
    assert last.read_bytes() == before and torch.load(last, weights_only=True)["step"] == 1
    left = [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert len(left) == 1 and left[0].startswith(".last.ckpt.") and left[0].endswith(".tmp")  # hidden, not a ckpt
    ck.save_torch({"step": 3}, last)  # the next save of that name removes the dead writer's file
    assert os.listdir(tmp_path) == ["last.ckpt"] and torch.load(last, weights_only=True)["step"] == 3


def test_tiny_filesystem_full(tmp_path):
    """A real full disk: a 1 MiB tmpfs (needs root and mount; skipped otherwise)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        from structvit.engine.callbacks import AtomicCheckpointIO

        io = AtomicCheckpointIO()
        io.save_checkpoint({"w": torch.zeros(1000)}, mnt / "last.ckpt")
        before = (mnt / "last.ckpt").read_bytes()
        with pytest.raises(ck.CheckpointWriteError, match="last.ckpt: No space left on device"):
            io.save_checkpoint({"w": torch.zeros(1 << 19)}, mnt / "last.ckpt")
        assert (mnt / "last.ckpt").read_bytes() == before and os.listdir(mnt) == ["last.ckpt"]
        with pytest.raises(ck.CheckpointWriteError, match="m.safetensors"):
            ck.write_safetensors(mnt / "m.safetensors", {"w": torch.zeros(1 << 19)})
        assert os.listdir(mnt) == ["last.ckpt"]
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# ------------------------------------------------------------------------------ model names
def test_one_model_name_check():
    names = project_model_names()
    assert "structvit_tiny" in names and "structvit_deit_tiny" in names
    for name in names + ("vit_tiny_patch16_224",):
        assert check_model_name(name) == name
    for bad in ("nope", "hf-hub:org/repo", "structvit_tiny.in1k", "/etc/passwd", None, 3):
        with pytest.raises(ValueError, match=r"--model: unknown model .*structvit_deit_tiny"):
            check_model_name(bad, "--model")


def test_every_command_accepts_the_deit_style_models(tmp_path, capsys):
    from structvit import report
    from structvit.viz import cli as viz_cli

    assert report.main(["structvit_deit_tiny", "--no-measure", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "structvit_deit_tiny" and out["flops_check"]
    assert viz_cli.main(["attention", "--model", "structvit_deit_tiny", "--out", str(tmp_path)]) == 0, \
        capsys.readouterr().err
    assert list(tmp_path.glob("attention_*.png"))
    for argv in (["nope", "--no-measure"],):
        assert report.main(argv) == 2
        assert "unknown model 'nope'" in capsys.readouterr().err
    assert viz_cli.main(["attention", "--model", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


COMMANDS = ("predict", "report", "convert", "demo", "bench", "study", "cli", "viz")


def _imported_modules(path, package):
    """Absolute names of the structvit modules ``path`` imports, at any depth (lazy imports too)."""
    import ast

    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield mod
            yield from (f"{mod}.{a.name}" for a in node.names)


def test_no_core_module_imports_a_command():
    """The library (ops, nn, models, data, engine, checkpoint I/O, inference, conversion) is
    usable without the commands: no core module imports a command module, even lazily."""
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src" / "structvit"
    core = [p for d in ("ops", "nn", "models", "data", "engine") for p in (src / d).rglob("*.py")]
    core += [src / f for f in ("checkpoint.py", "inference.py", "conversion.py", "config.py")]
    # commands that live inside a core package (`structvit models`, `structvit data check`)
    core = [p for p in core if p.name not in ("summary.py", "check.py")]
    bad = []
    for path in core:
        rel = path.relative_to(src.parent).with_suffix("")
        package = ".".join(rel.parts[:-1]) if path.name != "__init__.py" else ".".join(rel.parts[:-1])
        for mod in _imported_modules(path, package):
            parts = mod.split(".")
            if parts[0] == "structvit" and len(parts) > 1 and parts[1] in COMMANDS:
                bad.append(f"{rel}: {mod}")
    assert not bad, bad


def test_bench_and_study_use_the_same_check(tmp_path):
    import yaml

    from structvit.bench.model import run_model
    from structvit.study.cli import STUDIES
    from structvit.study.plan import StudyError, load_study

    with pytest.raises(ValueError, match="models: unknown model 'nope'.*structvit_deit_tiny"):
        run_model(what=("infer",), models=["nope"])
    raw = yaml.safe_load(open(STUDIES["ablation"]))
    task = next(iter(raw["tasks"]))
    raw["tasks"][task]["model"] = "hf-hub:evil/model"
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(StudyError, match="study.yaml: task .*'model': unknown model 'hf-hub:evil/model'"):
        load_study(path)
