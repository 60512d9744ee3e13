"""Build and load the fused CPU kernel (``csrc/folded_cpu.cpp``) on first use.

The kernel has a plain C ABI and no PyTorch headers, so it compiles in about a
second with the system C++ compiler and loads with :mod:`ctypes`. The shared library
is cached under ``$STRUCTVIT_CACHE`` (default ``~/.cache/structvit``), keyed by the
source, the compiler flags and the CPU's feature flags (it is built with
``-march=native``). Without a compiler the "fused" backend is simply unavailable and
"auto" does not pick it.

Threads: where PyTorch's own GNU OpenMP runtime (``libgomp.so.1``) is loaded, the kernel is
built with ``-fopenmp`` and runs on PyTorch's thread pool (the dynamic loader binds the
kernel's ``libgomp.so.1`` to the copy already in the process); elsewhere (or with
``STRUCTVIT_NATIVE_OPENMP=0``) it uses std::threads, since a second OpenMP runtime would
spin against PyTorch's.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "folded_cpu.cpp"
# -fno-trapping-math lets the compiler vectorise floor() in the kernel's exp (measured: the
# kernel's softmax 8x faster); nothing relies on floating-point exceptions or errno.
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fno-trapping-math", "-fno-math-errno", "-fopenmp-simd", "-pthread", "-shared", "-fPIC", "-std=c++17"]


OPENMP_FLAGS = ["-fopenmp", "-DSTRUCTSA_OPENMP"]


def _loaded_gomp() -> list[str]:
    """Paths of the GNU OpenMP runtimes mapped into this process (Linux; [] elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libgomp" in line}
    except OSError:
        return []
    return sorted(p for p in paths if os.path.basename(p).startswith("libgomp.so.1"))


def shares_torch_openmp() -> bool:
    """Whether the kernel joins PyTorch's OpenMP pool: exactly one libgomp with the soname
    libgomp.so.1 is loaded (PyTorch's, imported by this module), and
    ``STRUCTVIT_NATIVE_OPENMP=0`` does not ask for the std::thread build."""
    if os.environ.get("STRUCTVIT_NATIVE_OPENMP", "1") == "0":
        return False
    return "OpenMP" in torch.__config__.parallel_info() and len(_loaded_gomp()) == 1


class NativeUnavailable(RuntimeError):
    """The fused CPU kernel could not be built or loaded."""


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def cache_dir() -> Path:
    return Path(os.environ.get("STRUCTVIT_CACHE", Path.home() / ".cache" / "structvit"))


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@functools.lru_cache(maxsize=None)
def load() -> ctypes.CDLL:
    """The loaded kernel library; raises :class:`NativeUnavailable` with the reason."""
    if os.environ.get("STRUCTVIT_DISABLE_NATIVE"):
        raise NativeUnavailable("disabled by STRUCTVIT_DISABLE_NATIVE")
    cxx = _compiler()
    if cxx is None:
        raise NativeUnavailable("no C++ compiler found (set CXX, or install g++)")
    src = SOURCE.read_bytes()
    flags = FLAGS + (OPENMP_FLAGS if shares_torch_openmp() else [])
    key = hashlib.sha256(src + " ".join([cxx] + flags).encode() + _cpu_key().encode()).hexdigest()[:16]
    lib_path = cache_dir() / f"structsa_folded_{key}.so"
    if not lib_path.exists():
        lib_path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
            out = Path(tmp) / lib_path.name
            res = subprocess.run([cxx, *flags, str(SOURCE), "-o", str(out)], capture_output=True, text=True)
            if res.returncode != 0:
                raise NativeUnavailable(f"compiling {SOURCE.name} failed:\n{res.stderr[-3000:]}")
            os.replace(out, lib_path)  # atomic: concurrent builders leave one complete file
    lib = ctypes.CDLL(str(lib_path))
    i64, ptr, cint, dbl = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_double
    for suffix in ("f32", "f64"):
        # (tensors..., BH, R, dims, scale, joint[, at_saved], threads)
        getattr(lib, f"structsa_folded_forward_{suffix}").argtypes = [ptr] * 5 + [i64, i64, ptr, dbl, cint, cint]
        getattr(lib, f"structsa_folded_backward_{suffix}").argtypes = [ptr] * 10 + [i64, i64, ptr, dbl] + [cint] * 3
    return lib


def available() -> bool:
    """Whether the fused CPU kernel can be used here (builds it on the first call)."""
    try:
        load()
        return True
    except NativeUnavailable:
        return False
