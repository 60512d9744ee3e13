"""Run-time settings of StructViT: every ``STRUCTVIT_*`` environment variable, read here once.

Each setting is read from its environment variable when this module is first imported
(validated: a bad value raises ``ValueError`` naming the variable) and can be changed from
code with its setter, like timm's ``set_fused_attn``:

=============================  =====================  ==============================================
variable                       setter                 meaning
=============================  =====================  ==============================================
``STRUCTVIT_DISABLE_NATIVE``   ``set_native``         ``1``/``true``: never build or use the fused
                               (``enabled=False``)    CPU kernel; ``0``/``false``/unset: use it
``STRUCTVIT_NATIVE_CONV``      ``set_native_conv``    ``0``/``false``: keyconv uses PyTorch's
                                                      convolutions instead of its own CPU kernel
                                                      (default ``1``: the kernel, where it builds)
``STRUCTVIT_TRITON``           ``set_triton``         ``0``/``false``: on CUDA, keyconv's pattern
                                                      convolutions and the backbone's depthwise
                                                      convolutions use PyTorch's kernels instead of
                                                      the Triton ones (default ``1``: Triton, where
                                                      it is installed)
``STRUCTVIT_CACHE``            ``set_cache_dir``      where built kernels are cached
                                                      (default ``~/.cache/structvit``)
``STRUCTVIT_NATIVE_OPENMP``    ``set_native_openmp``  ``0``: build the kernel with std::threads
                                                      instead of joining PyTorch's OpenMP pool
``STRUCTVIT_BUFFER_CACHE_MB``  ``set_buffer_cache_mb``  MiB of the fused kernel's buffers kept
                                                      for reuse (default 1024; 0: off)
``STRUCTVIT_TRACEBACK``        ``set_traceback``      ``1``: the CLI shows full tracebacks
``STRUCTVIT_NATIVE_ARCH``      ``set_native_arch``    target of the fused kernel's build: ``native``
                                                      (default: this CPU), ``generic`` (the
                                                      compiler's baseline), or a ``-march`` name
                                                      such as ``haswell`` (AVX2 + FMA) or
                                                      ``x86-64-v4`` (AVX-512)
``STRUCTVIT_AUTOTUNE``         ``set_autotune``       how "auto" picks among the backends that
                                                      can serve a call: ``measure`` (default:
                                                      time them once per shape class, cached per
                                                      machine), ``deterministic`` (never time:
                                                      use the timings already recorded, else the
                                                      cost model), ``off`` (cost model only)
=============================  =====================  ==============================================

``CXX`` (the compiler for the fused kernel) is read here too. ``settings()`` returns the
current values; the native loader re-checks its settings on every call, so a setter takes
effect at the next op call (a kernel already loaded with other build settings is rebuilt).
"""
from __future__ import annotations

import dataclasses
import os
import re
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


AUTOTUNE_MODES = ("measure", "deterministic", "off")
_ARCH_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def _check_arch(name: str, raw) -> str:
    if not isinstance(raw, str) or not _ARCH_RE.fullmatch(raw.strip()):
        raise ValueError(f"{name} must be 'native', 'generic' or a -march name such as 'haswell', got {raw!r}")
    return raw.strip()


def _check_autotune(name: str, raw) -> str:
    value = raw.strip().lower() if isinstance(raw, str) else raw
    if value not in AUTOTUNE_MODES:
        raise ValueError(f"{name} must be one of {AUTOTUNE_MODES}, got {raw!r}")
    return value


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
    native_arch: str = "native"
    autotune: str = "measure"
    native_conv: bool = True
    triton: bool = True

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
        native_arch=_check_arch("STRUCTVIT_NATIVE_ARCH", os.environ.get("STRUCTVIT_NATIVE_ARCH", "native")),
        autotune=_check_autotune("STRUCTVIT_AUTOTUNE", os.environ.get("STRUCTVIT_AUTOTUNE", "measure")),
        native_conv=_env_bool("STRUCTVIT_NATIVE_CONV", True),
        triton=_env_bool("STRUCTVIT_TRITON", True),
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


def set_native_conv(enabled: bool) -> None:
    """Whether keyconv computes its pattern convolutions with its own CPU kernel (True, where
    the native library builds) or with PyTorch's convolutions (False) (``STRUCTVIT_NATIVE_CONV``)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    _replace(native_conv=enabled)


def set_triton(enabled: bool) -> None:
    """Whether CUDA tensors use the Triton kernels (True, where Triton is installed) or PyTorch's
    convolutions (False) for keyconv's pattern convolutions and the backbone's depthwise
    convolutions (``STRUCTVIT_TRITON``)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    _replace(triton=enabled)


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


def set_native_arch(arch: str) -> None:
    """Target of the fused kernel's build (``STRUCTVIT_NATIVE_ARCH``): "native", "generic" or a
    ``-march`` name ("haswell": AVX2 + FMA, "x86-64-v4": AVX-512). Takes effect at the next call
    (each target is built and cached once)."""
    _replace(native_arch=_check_arch("arch", arch))


def set_autotune(mode: str) -> None:
    """How "auto" chooses (``STRUCTVIT_AUTOTUNE``): "measure", "deterministic" or "off"."""
    _replace(autotune=_check_autotune("mode", mode))
