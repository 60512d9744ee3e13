"""Settings (every STRUCTVIT_* variable in one place) and a native kernel cache that cannot crash."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from structvit import config
from structvit.ops import native, struct_attention
from structvit.ops.dispatch import unsupported

HAS_COMPILER = native.available()


@pytest.fixture
def restore_settings():
    saved = config.settings()
    native.reset()
    yield
    config._settings = saved
    native.reset()


@pytest.mark.parametrize("raw,expected", [("1", False), ("true", False), ("ON", False), ("0", True), ("false", True),
                                          ("", True)])
def test_disable_native_values(raw, expected, monkeypatch, restore_settings):
    monkeypatch.setenv("STRUCTVIT_DISABLE_NATIVE", raw)
    assert config.reload_from_environment().native is expected


@pytest.mark.parametrize("name,raw", [("STRUCTVIT_DISABLE_NATIVE", "maybe"), ("STRUCTVIT_NATIVE_OPENMP", "2"),
                                      ("STRUCTVIT_NATIVE_CONV", "sometimes"),
                                      ("STRUCTVIT_BUFFER_CACHE_MB", "-1"), ("STRUCTVIT_BUFFER_CACHE_MB", "lots"),
                                      ("STRUCTVIT_BUFFER_CACHE_MB", "nan")])
def test_bad_environment_values_name_the_variable(name, raw, monkeypatch, restore_settings):
    monkeypatch.setenv(name, raw)
    with pytest.raises(ValueError, match=name):
        config.reload_from_environment()


def test_environment_and_setters(monkeypatch, tmp_path, restore_settings):
    monkeypatch.setenv("STRUCTVIT_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("STRUCTVIT_BUFFER_CACHE_MB", "2")
    s = config.reload_from_environment()
    assert s.cache_dir == tmp_path / "c" and s.buffer_cache_bytes == 2 << 20
    from structvit.ops.buffers import cache_limit_bytes

    assert cache_limit_bytes() == 2 << 20
    config.set_buffer_cache_mb(0.5)
    assert cache_limit_bytes() == 1 << 19
    config.set_cache_dir(tmp_path / "d")
    assert native.cache_dir() == tmp_path / "d"
    with pytest.raises(ValueError, match="mb must be a number of MiB >= 0"):
        config.set_buffer_cache_mb(-3)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        config.set_native("no")


def test_set_native_false_turns_the_fused_backend_off(restore_settings):
    config.set_native(False)
    assert not native.available()
    assert "disabled" in native.unavailable_reason()
    reason = unsupported("fused", channelwise=False, strided=False, same_window=True)
    assert "unavailable here: disabled" in reason
    q = torch.randn(1, 1, 12, 4)
    u = torch.randn(2, 3, 3)
    with pytest.raises(ValueError, match="backend='fused' cannot serve this call: the fused CPU kernel is unavailable"):
        struct_attention(q, q, q, u, u, (3, 4), backend="fused")
    struct_attention(q, q, q, u, u, (3, 4))  # "auto" still runs


def test_missing_compiler_is_reported_once(restore_settings):
    config.set_compiler("/nonexistent/c++")
    with pytest.warns(RuntimeWarning, match=r"unavailable, using PyTorch-op backends: the compiler CXX='/nonexistent/c\+\+' was not found"):
        assert not native.available()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert not native.available()


def _run_fused_in_subprocess(env: dict) -> subprocess.CompletedProcess:
    code = """
import torch, warnings
from structvit.ops import native, struct_attention
q = torch.randn(1, 1, 12, 4, dtype=torch.float64)
u = torch.randn(2, 3, 3, dtype=torch.float64)
out = struct_attention(q, q, q, u, u, (3, 4), backend="fused")
ref = struct_attention(q, q, q, u, u, (3, 4), backend="naive")
torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
print(native.load()._name)
"""
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler for the fused CPU kernel")
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_cached_library_is_rebuilt(damage, tmp_path):
    """A truncated cached .so (which dlopen would map and then crash on with SIGBUS) or a
    garbage one is detected by its recorded hash and rebuilt, in a fresh process."""
    env = {"STRUCTVIT_CACHE": str(tmp_path)}
    first = _run_fused_in_subprocess(env)
    assert first.returncode == 0, first.stderr[-2000:]
    lib = tmp_path / os.path.basename(first.stdout.strip())
    data = lib.read_bytes()
    lib.write_bytes(data[: len(data) // 3] if damage == "truncate" else b"\x7fELF not really a library")
    second = _run_fused_in_subprocess(env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert lib.read_bytes() == data or len(lib.read_bytes()) > len(data) // 2  # rebuilt


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler for the fused CPU kernel")
@pytest.mark.parametrize("where", ["file", "unwritable"])
def test_unusable_cache_directory_falls_back(where, tmp_path):
    """STRUCTVIT_CACHE pointing at a file, or at a directory nobody may write, must not break
    a forward pass: the kernel is built in a private temporary directory instead."""
    if where == "file":
        target = tmp_path / "a_file"
        target.write_text("not a directory")
    else:
        if os.geteuid() == 0:
            pytest.skip("root can write anywhere")
        target = tmp_path / "ro"
        target.mkdir()
        target.chmod(0o500)
    res = _run_fused_in_subprocess({"STRUCTVIT_CACHE": str(target)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert not res.stdout.strip().startswith(str(target))
