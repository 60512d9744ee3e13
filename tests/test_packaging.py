"""Packaging: a lean core, commands that need an extra name it, the wheel's package data."""
from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import pytest

from structvit import cli

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
OPTIONAL = ["lightning", "pytorch_lightning", "matplotlib", "av", "sklearn", "jsonargparse", "tensorboard", "torchmetrics"]


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_core_import_needs_no_extra():
    # `import structvit` and building a model must not import any optional dependency.
    code = (
        "import sys, timm, torch, structvit\n"
        "m = timm.create_model('structvit_tiny', num_classes=3)\n"
        "assert m(torch.randn(1, 3, 64, 64)).shape == (1, 3)\n"
        f"print(sorted(n for n in {OPTIONAL!r} if n in sys.modules))\n"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("blocked", ["lightning", "jsonargparse"])
def test_fit_without_training_extra_says_what_to_install(blocked):
    # sys.modules[name] = None makes `import name` raise ModuleNotFoundError, as if it were not installed.
    code = (
        "import sys\n"
        f"sys.modules[{blocked!r}] = None\n"
        "from structvit.cli import main\n"
        "sys.exit(main(['fit', '--help']))\n"
    )
    proc = _run(code)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"structvit fit needs the training extra (module {blocked!r} is not installed)" in proc.stderr
    assert 'pip install "structvit[train]"' in proc.stderr


def _fake_command(monkeypatch, body):
    module = types.ModuleType("structvit_fake_command")
    module.main = body
    monkeypatch.setitem(sys.modules, "structvit_fake_command", module)
    monkeypatch.setitem(cli.COMMANDS, "fake", ("structvit_fake_command", "a test command"))


@pytest.mark.parametrize("blocked, extra", [("av", "video"), ("matplotlib.pyplot", "viz"), ("sklearn.datasets", "train")])
def test_extra_missing_while_running(monkeypatch, capsys, blocked, extra):
    # An extra imported lazily, in the middle of a command, is reported the same way.
    monkeypatch.setitem(sys.modules, blocked, None)

    def main(argv):
        __import__(blocked)

    _fake_command(monkeypatch, main)
    assert cli.main(["fake"]) == 2
    err = capsys.readouterr().err
    assert f'pip install "structvit[{extra}]"' in err
    assert f"module {blocked!r} is not installed" in err


def test_other_missing_module_is_not_masked(monkeypatch):
    # A missing module that no extra provides is a bug (or a broken install), not a hint: it propagates.
    def main(argv):
        import structvit_no_such_module  # noqa: F401

    _fake_command(monkeypatch, main)
    with pytest.raises(ModuleNotFoundError, match="structvit_no_such_module"):
        cli.main(["fake"])


def test_cli_extras_exist_in_pyproject():
    optional = PYPROJECT["project"]["optional-dependencies"]
    for module, extra in cli.EXTRAS.items():
        assert extra in optional, f"{module} -> {extra!r}, not an extra in pyproject.toml"
        assert extra in cli.EXTRA_NAMES
    # dev (what `make install` installs) has every extra, so the test venv has everything
    dev = " ".join(optional["dev"])
    assert all(extra in dev for extra in set(cli.EXTRAS.values()))
    core = " ".join(PYPROJECT["project"]["dependencies"])
    for heavy in ["lightning", "matplotlib", "av", "scikit-learn", "jsonargparse", "tensorboard", "torchmetrics"]:
        assert heavy not in core


def test_wheel_ships_native_kernel_source():
    # Files under src/structvit that are not Python must be listed as package data, or a wheel lacks them.
    package_data = PYPROJECT["tool"]["setuptools"]["package-data"]
    src = ROOT / "src" / "structvit"
    data_files = [p for p in src.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")
                  and "__pycache__" not in p.parts]
    assert any(p.name == "fused_cpu.cpp" for p in data_files)
    for path in data_files:
        rel = path.relative_to(src.parent)
        covered = False
        for package, patterns in package_data.items():
            pkg_dir = Path(*package.split("."))
            if pkg_dir in rel.parents:
                covered |= any(fnmatch.fnmatch(str(rel.relative_to(pkg_dir)), pat) for pat in patterns)
        assert covered, f"{rel} is not in [tool.setuptools.package-data] and would be left out of the wheel"
