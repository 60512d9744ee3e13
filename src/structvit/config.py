"""Run-time settings of StructViT: every ``STRUCTVIT_*`` environment variable, read here once.

Each setting is read from its environment variable when this module is first imported
(validated: a bad value raises ``ValueError`` naming the variable) and can be changed from
code with its setter, like timm's ``set_fused_attn``:

=============================  =====================  ==============================================
variable                       setter                 meaning
=============================  =====================  ==============================================
``STRUCTVIT_DISABLE_NATIVE``   ``set_native``         ``1``/``true``: never build or use the fused
                               (``enabled=False``)    CPU kernel; ``0``/``false``/unset: use it
``STRUCTVIT_CACHE``            ``set_cache_dir``      where built kernels are cached
                                                      (default ``~/.cache/structvit``)
``STRUCTVIT_NATIVE_OPENMP``    ``set_native_openmp``  ``0``: build the kernel with std::threads
                                                      instead of joining PyTorch's OpenMP pool
``STRUCTVIT_BUFFER_CACHE_MB``  ``set_buffer_cache_mb``  MiB of the fused kernel's buffers kept
                                                      for reuse (default 1024; 0: off)
``STRUCTVIT_TRACEBACK``        ``set_traceback``      ``1``: the CLI shows full tracebacks
=============================  =====================  ==============================================

``CXX`` (the compiler for the fused kernel) is read here too. ``settings()`` returns the
current values; the native loader re-checks its settings on every call, so a setter takes
effect at the next op call (a kernel already loaded with other build settings is rebuilt).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name} must be one of {_TRUE + _FALSE[:-1]} (or empty), got {raw!r}")


def _check_mb(name: str, raw) -> float:
    try:
        mb = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of MiB >= 0, got {raw!r}") from None
    if not mb >= 0:  # also rejects NaN
        raise ValueError(f"{name} must be a number of MiB >= 0, got {raw!r}")
    return mb


@dataclasses.dataclass(frozen=True)
class Settings:
    """The current settings (see the module docstring)."""

    native: bool
    cache_dir: Path
    native_openmp: bool
    buffer_cache_mb: float
    traceback: bool
    cxx: str | None

    @property
    def buffer_cache_bytes(self) -> int:
        return int(self.buffer_cache_mb * (1 << 20))


def _from_environment() -> Settings:
    cache = os.environ.get("STRUCTVIT_CACHE")
    return Settings(
        native=not _env_bool("STRUCTVIT_DISABLE_NATIVE", False),
        cache_dir=Path(cache).expanduser() if cache else Path.home() / ".cache" / "structvit",
        native_openmp=_env_bool("STRUCTVIT_NATIVE_OPENMP", True),
        buffer_cache_mb=_check_mb("STRUCTVIT_BUFFER_CACHE_MB", os.environ.get("STRUCTVIT_BUFFER_CACHE_MB", "1024")),
        traceback=_env_bool("STRUCTVIT_TRACEBACK", False),
        cxx=os.environ.get("CXX") or None,
    )


_settings = _from_environment()


def settings() -> Settings:
    """The current settings."""
    return _settings


def _replace(**changes) -> None:
    global _settings
    _settings = dataclasses.replace(_settings, **changes)


def reload_from_environment() -> Settings:
    """Read every ``STRUCTVIT_*`` variable (and ``CXX``) again, e.g. after changing ``os.environ``."""
    global _settings
    _settings = _from_environment()
    return _settings


def set_native(enabled: bool) -> None:
    """Allow (True) or forbid (False) the fused CPU kernel (``STRUCTVIT_DISABLE_NATIVE``)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    _replace(native=enabled)


def set_cache_dir(path: str | os.PathLike) -> None:
    """Where the fused kernel's builds are cached (``STRUCTVIT_CACHE``)."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise TypeError(f"path must be a non-empty str or path, got {path!r}")
    _replace(cache_dir=Path(path).expanduser())


def set_native_openmp(enabled: bool) -> None:
    """Build the fused kernel on PyTorch's OpenMP pool (True) or on std::threads (``STRUCTVIT_NATIVE_OPENMP``)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    _replace(native_openmp=enabled)


def set_buffer_cache_mb(mb: float) -> None:
    """Bound of the fused kernel's reusable buffers in MiB, 0 to turn the cache off (``STRUCTVIT_BUFFER_CACHE_MB``)."""
    _replace(buffer_cache_mb=_check_mb("mb", mb))


def set_traceback(enabled: bool) -> None:
    """Whether the CLI prints full tracebacks (``STRUCTVIT_TRACEBACK``)."""
    _replace(traceback=bool(enabled))


def set_compiler(cxx: str | None) -> None:
    """The C++ compiler for the fused kernel (``CXX``); None: the first of g++, c++, clang++ found."""
    if cxx is not None and (not isinstance(cxx, str) or not cxx):
        raise TypeError(f"cxx must be a non-empty str or None, got {cxx!r}")
    _replace(cxx=cxx)
