"""timm's own ``tests/test_models.py``, unchanged, on this project's models.

Opt-in (``-m slow``) and only where timm's test file is at hand: set ``STRUCTVIT_TIMM_TESTS``
to its path (a checkout of huggingface/pytorch-image-models: ``tests/test_models.py``).
The file is copied into a temporary folder next to ``timm_upstream/adapter_conftest.py``
(as ``conftest.py``: the project's names only, video models fed 5-D clips, see there) and
run by pytest in a subprocess. ``STRUCTVIT_TIMM_MODELS`` (comma-separated patterns) picks
the models: by default the four tiny ones; ``structvit*`` runs every registered name
(the paper-size models take a long time on a CPU).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TIMM_TESTS = os.environ.get("STRUCTVIT_TIMM_TESTS")
ADAPTER = Path(__file__).parent / "timm_upstream" / "adapter_conftest.py"
TINY = "structvit_tiny,structvit_tiny_video,structvit_deit_tiny,structvit_deit_tiny_video"


@pytest.mark.slow
@pytest.mark.skipif(not TIMM_TESTS, reason="set STRUCTVIT_TIMM_TESTS to timm's tests/test_models.py")
def test_timm_test_models_passes_on_our_models(tmp_path):
    source = Path(TIMM_TESTS)
    assert source.is_file(), f"STRUCTVIT_TIMM_TESTS={TIMM_TESTS!r} is not a file"
    shutil.copy(source, tmp_path / "test_models.py")
    shutil.copy(ADAPTER, tmp_path / "conftest.py")
    env = {**os.environ, "STRUCTVIT_TIMM_MODELS": os.environ.get("STRUCTVIT_TIMM_MODELS", TINY)}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore",
                          "-o", "addopts=", "test_models.py"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=3600)
    tail = res.stdout[-6000:] + res.stderr[-2000:]
    assert res.returncode == 0, tail
    passed = re.search(r"(\d+) passed", res.stdout)
    models = len(env["STRUCTVIT_TIMM_MODELS"].split(","))
    # forward, backward, a cfg test, TorchScript, fx forward / backward / scripted: at least 7 a model
    assert passed and int(passed.group(1)) >= 7 * models, tail
