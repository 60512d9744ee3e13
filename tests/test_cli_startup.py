"""The console command starts without torch: `structvit --help` / `--version` import neither
torch, timm nor the structvit package (whose __init__ registers the models)."""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import structvit
import structvit_cli
from structvit import cli

HEAVY = ("torch", "timm", "structvit", "numpy")


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_import_no_torch(flag):
    code = ("import sys\nfrom structvit_cli import main\n"
            f"code = main([{flag!r}])\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules), code)\n")
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    *printed, modules = proc.stdout.strip().splitlines()
    assert modules == "[] 0"
    if flag == "--version":
        assert printed == [structvit.__version__]
    else:
        assert printed[0].startswith("usage: structvit COMMAND") and any(" models " in line for line in printed)


def test_console_script_is_the_light_entry_point():
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")
               if e.dist is not None and e.dist.name == "structvit"}
    assert scripts == {"structvit": "structvit_cli:main"}


def test_console_script_answers_help_within_a_second():
    script = Path(sys.executable).with_name("structvit")
    if not script.exists():
        pytest.skip("the structvit console script is not installed next to this Python")
    times = []
    for _ in range(3):  # the best of three: the machine may be busy
        start = time.perf_counter()
        proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
        times.append(time.perf_counter() - start)
        assert proc.returncode == 0 and proc.stdout.startswith("usage: structvit COMMAND")
    assert min(times) < 1.0, f"structvit --help took {min(times):.2f} s"


def test_unknown_command_exits_2_without_torch():
    proc = _run("import sys\nfrom structvit_cli import main\ncode = main(['nosuch'])\n"
                f"print(sorted(m for m in {HEAVY!r} if m in sys.modules), code)\n")
    assert proc.stdout.strip() == "[] 2" and "unknown command 'nosuch'" in proc.stderr


def test_launcher_runs_the_imported_cli_module(monkeypatch):
    """Once structvit is imported, the launcher runs structvit.cli itself (what tests patch)."""
    calls = []
    module = type(sys)("structvit_fake_command")
    module.main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, "structvit_fake_command", module)
    monkeypatch.setitem(cli.COMMANDS, "fake", ("structvit_fake_command", "a test command"))
    assert structvit_cli.main(["fake", "--x"]) == 0
    assert calls == [["--x"]]
