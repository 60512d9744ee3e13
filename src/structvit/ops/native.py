"""Build and load the CPU kernels (``csrc/``) on first use: the fused kernel
(``fused_cpu.cpp``) and keyconv's pattern convolutions (``pattern_conv_cpu.cpp``), one
shared library.

The kernels have a plain C ABI and no PyTorch headers, so they compile in a few seconds
with the system C++ compiler and load with :mod:`ctypes`; the ops that call them are
``torch.library`` custom ops (``backends/fused.py``, ``backends/native_conv.py``). The shared library is cached
under the cache directory (``structvit.config``: ``STRUCTVIT_CACHE``, default
``~/.cache/structvit``), keyed by the sources, the compiler, the flags and the CPU's
feature flags and the build target (``STRUCTVIT_NATIVE_ARCH``: ``native`` by default, i.e.
``-march=native``; ``haswell`` builds the AVX2 + FMA variant, ``generic`` the portable one, so
that each can be built and tested on one machine). The kernels pick their vector width and
register tiles from the target's ISA at compile time (``csrc/vec.h``: AVX-512, AVX2, NEON or
generic); a build whose ISA this CPU lacks is refused. Without a compiler, or with the
library disabled, the "fused" backend is unavailable, "auto" does not pick it, keyconv
uses PyTorch's convolutions, and one warning says why.

A cached library is loaded only if its SHA-256 matches the one recorded when it was
built, so a truncated or foreign file (which ``dlopen`` would map and crash on) is
rebuilt instead; an unwritable cache directory falls back to a private temporary one.

The C ABI: each kernel takes one argument structure (:class:`ConvArgs`, :class:`FusedArgs`,
mirrored by ``csrc/abi.h``) and the data pointers of its tensors, and returns NULL or a
message saying what it refused (:func:`call` raises it as :class:`KernelRefused`). The
library reports its ABI version and each structure's field list and size, which are
compared with this module's when it loads; a cached library that differs is rebuilt.
The custom ops check their arguments in Python first; the kernels' own checks (a
consistent geometry, buffers that hold what it reaches) are a second line of defence.

Threads: where PyTorch's own GNU OpenMP runtime (``libgomp.so.1``) is loaded, the kernel is
built with ``-fopenmp`` and runs on PyTorch's thread pool (the dynamic loader binds the
kernel's ``libgomp.so.1`` to the copy already in the process); elsewhere (or with
``STRUCTVIT_NATIVE_OPENMP=0``) it uses std::threads, since a second OpenMP runtime would
spin against PyTorch's.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from .. import config
from . import cpuinfo

CSRC = Path(__file__).with_name("csrc")
SOURCE = CSRC / "fused_cpu.cpp"  # the fused kernel
# compiled into one library: the fused kernel and keyconv's pattern convolutions
SOURCES = (SOURCE, CSRC / "pattern_conv_cpu.cpp")
HEADERS = (CSRC / "abi.h", CSRC / "parallel.h", CSRC / "vec.h")


def source_bytes() -> bytes:
    """The kernels' source text (sources and headers): part of every cache key."""
    return b"".join(p.read_bytes() for p in (*SOURCES, *HEADERS) if p.is_file())
# -fno-trapping-math lets the compiler vectorise floor() in the kernel's exp; nothing
# relies on floating-point exceptions or errno.
FLAGS = ["-O3", "-ffp-contract=fast", "-fno-trapping-math", "-fno-math-errno", "-fopenmp-simd",
         "-pthread", "-shared", "-fPIC", "-std=c++17"]
OPENMP_FLAGS = ["-fopenmp", "-DSTRUCTSA_OPENMP"]
# STRUCTVIT_NATIVE_SANITIZE=address builds the kernels with AddressSanitizer (a separate
# cache entry), for checking them (``make asan``). Python is not instrumented, so the
# process needs the runtime preloaded: LD_PRELOAD=$(gcc -print-file-name=libasan.so).
SANITIZE_FLAGS = {"address": ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]}


def sanitize_flags() -> list[str]:
    """The sanitizer flags STRUCTVIT_NATIVE_SANITIZE asks for ([] when unset)."""
    name = os.environ.get("STRUCTVIT_NATIVE_SANITIZE", "")
    if name and name not in SANITIZE_FLAGS:
        raise NativeUnavailable(f"STRUCTVIT_NATIVE_SANITIZE must be one of {sorted(SANITIZE_FLAGS)}, got {name!r}")
    return SANITIZE_FLAGS.get(name, [])


# CPU feature flags (/proc/cpuinfo) each build's vector code needs, by the ISA the kernel
# reports it was compiled for (structvit_isa()); a build the CPU cannot run is refused
# instead of dying on an illegal instruction.
ISA_CPU_FLAGS = {"avx512": ("avx512f",), "avx2": ("avx2", "fma"), "neon": (), "generic": ()}


def arch_flags(arch: str) -> list[str]:
    """Compiler flags for a build target (``config.settings().native_arch``): "native" is this
    CPU (``-march=native``; ``-mcpu=native`` on ARM, where GCC prefers it), "generic" the
    compiler's baseline for the platform (x86-64: SSE2; aarch64: NEON), else ``-march=<arch>``."""
    if arch == "generic":
        return []
    if arch == "native" and platform.machine().lower() in ("aarch64", "arm64"):
        return ["-mcpu=native"]
    return [f"-march={arch}"]


class NativeUnavailable(RuntimeError):
    """The fused CPU kernel could not be built or loaded."""


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
    libgomp.so.1 is loaded (PyTorch's, imported by this module), and the std::thread build
    is not asked for (``config.set_native_openmp(False)``, ``STRUCTVIT_NATIVE_OPENMP=0``)."""
    if not config.settings().native_openmp:
        return False
    return "OpenMP" in torch.__config__.parallel_info() and len(_loaded_gomp()) == 1


def pointer(t: torch.Tensor) -> ctypes.c_void_p:
    """``t``'s data as a C pointer for the kernels' ctypes calls (the caller keeps ``t`` alive)."""
    return ctypes.c_void_p(t.data_ptr())


def cache_dir() -> Path:
    return config.settings().cache_dir


def compiler() -> str:
    """The C++ compiler to use; raises :class:`NativeUnavailable` naming what was looked for."""
    cxx = config.settings().cxx
    if cxx:  # asked for explicitly: that one or nothing
        found = shutil.which(cxx)
        if found is None:
            raise NativeUnavailable(f"the compiler CXX={cxx!r} was not found")
        return found
    for name in ("g++", "c++", "clang++"):
        if shutil.which(name):
            return shutil.which(name)
    raise NativeUnavailable("no C++ compiler found (install g++, or set CXX)")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _build(cxx: str, flags: list[str], lib_path: Path) -> None:
    """Compile into ``lib_path`` and record its hash next to it (both atomic replaces)."""
    lib_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
        out = Path(tmp) / lib_path.name
        try:
            res = subprocess.run([cxx, *flags, *map(str, SOURCES), "-o", str(out)], capture_output=True, text=True)
        except OSError as e:
            raise NativeUnavailable(f"running the compiler {cxx} failed: {e}") from None
        if res.returncode != 0:
            names = ", ".join(p.name for p in SOURCES)
            raise NativeUnavailable(f"compiling {names} with {cxx} failed:\n{res.stderr[-3000:]}")
        digest = Path(tmp) / (lib_path.name + ".sha256")
        digest.write_text(_sha256(out))
        os.replace(out, lib_path)  # concurrent builders leave one complete file
        os.replace(digest, lib_path.with_name(lib_path.name + ".sha256"))


def _verified(lib_path: Path) -> bool:
    digest = lib_path.with_name(lib_path.name + ".sha256")
    try:
        return lib_path.is_file() and digest.read_text().strip() == _sha256(lib_path)
    except OSError:
        return False


# ----------------------------------------------------------------------------- the C ABI
#
# Every kernel takes one argument structure by pointer, then its tensors' data pointers,
# and returns NULL or a message naming what it refused. The structures below are the
# Python side of csrc/abi.h; when the library loads, its ABI version and each structure's
# field list and size are compared with these (``_check_abi``), so a change on one side
# only is a clear error, never a misread argument.
ABI_VERSION = 4


class _KernelArgs(ctypes.Structure):
    """Base of the argument structures: keyword construction, every field required."""

    def __init__(self, **fields):
        names = [name for name, _ in self._fields_]
        missing = set(names) - set(fields)
        unknown = set(fields) - set(names)
        if missing or unknown:
            raise TypeError(f"{type(self).__name__}: missing fields {sorted(missing)}, unknown fields {sorted(unknown)}")
        super().__init__(**{name: fields[name] for name in names})

    @classmethod
    def signature(cls) -> str:
        """The field list as csrc/abi.h spells it: "name:i64 name:f64 ..."."""
        return " ".join(f"{name}:{'f64' if ctype is ctypes.c_double else 'i64'}" for name, ctype in cls._fields_) + " "


def _fields(names: str, ctype=ctypes.c_int64) -> list[tuple[str, type]]:
    return [(name, ctype) for name in names.split()]


class ConvArgs(_KernelArgs):
    """The pattern convolutions' arguments (``StructvitConvArgs`` in csrc/abi.h): geometry,
    the strides of the grid side x (B, heads, N, C) and of the pattern side y
    (B, heads, D * N', C), and the elements each tensor's memory holds."""

    _fields_ = _fields("B heads C D T H W kt kh kw st sh sw groups x_sb x_sh x_sn y_sb y_sh y_sn x_len w_len y_len "
                       "threads")


class FusedArgs(_KernelArgs):
    """The fused kernel's arguments (``StructvitFusedArgs`` in csrc/abi.h): geometry, the
    chunk's BH * R rows, the softmax and the elements each tensor's memory holds."""

    _fields_ = _fields("T H W kt kh kw D heads hu BH R joint at_saved threads s0_len at_len lse_len uk_len uv_len "
                       "dat_len rowdot_len ds0_len duk_len duv_len") + [("scale", ctypes.c_double)]


ARG_STRUCTS = {"conv": ConvArgs, "fused": FusedArgs}


def elements(t: torch.Tensor | None) -> int:
    """The elements ``t``'s memory holds from its data pointer on (0 for None): what a
    kernel may touch through that pointer at most."""
    if t is None:
        return 0
    return t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()


class KernelRefused(RuntimeError):
    """A kernel refused its arguments (its own checks, behind the Python ones)."""


def call(kernel, args: _KernelArgs, *tensors: torch.Tensor | None) -> None:
    """Run ``kernel(&args, data pointers...)``; raises :class:`KernelRefused` with the
    kernel's message when it refuses. The caller keeps the tensors alive."""
    message = kernel(ctypes.byref(args), *(None if t is None else pointer(t) for t in tensors))
    if message is not None:
        raise KernelRefused(f"{kernel.__name__}: {message.decode()}")


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    ptr, cint = ctypes.c_void_p, ctypes.c_int
    for name, restype in (("abi_version", cint), ("isa", ctypes.c_char_p), ("lanes", cint),
                          ("conv_args_signature", ctypes.c_char_p), ("conv_args_size", ctypes.c_int64),
                          ("fused_args_signature", ctypes.c_char_p), ("fused_args_size", ctypes.c_int64)):
        fn = getattr(lib, f"structvit_{name}")
        fn.restype, fn.argtypes = restype, []
    kernels = {"fused_forward": (FusedArgs, 5), "fused_backward": (FusedArgs, 10),
               "pattern_conv_forward": (ConvArgs, 3), "pattern_conv_grad_input": (ConvArgs, 3),
               "pattern_conv_grad_weight": (ConvArgs, 3)}
    for name, (struct, tensors) in kernels.items():
        for suffix in ("f32", "f64"):
            fn = getattr(lib, f"structvit_{name}_{suffix}")
            fn.restype = ctypes.c_char_p
            fn.argtypes = [ctypes.POINTER(struct)] + [ptr] * tensors
    return lib


def abi_mismatch(lib: ctypes.CDLL) -> str | None:
    """How the library's ABI differs from this module's (None: it matches)."""
    version = lib.structvit_abi_version()
    if version != ABI_VERSION:
        return f"ABI version {version}, expected {ABI_VERSION}"
    for kind, struct in ARG_STRUCTS.items():
        signature = getattr(lib, f"structvit_{kind}_args_signature")().decode()
        size = getattr(lib, f"structvit_{kind}_args_size")()
        if signature != struct.signature() or size != ctypes.sizeof(struct):
            return (f"the {kind} argument structure is {signature!r} ({size} bytes) in the library but "
                    f"{struct.signature()!r} ({ctypes.sizeof(struct)} bytes) in native.py")
    return None


def _load_uncached(cxx: str, flags: list[str], key: str) -> ctypes.CDLL:
    missing = [p for p in (*SOURCES, *HEADERS) if not p.is_file()]
    if missing:
        raise NativeUnavailable(f"the kernel sources {', '.join(map(str, missing))} are missing from the installed package")
    name = f"structvit_kernels_{key}.so"
    places = [cache_dir()]
    last_error = None
    for attempt in range(2):
        if attempt == 1:  # the cache directory is unusable: a private one for this process
            places.append(Path(tempfile.mkdtemp(prefix="structvit-")))
        lib_path = places[-1] / name
        try:
            built = not _verified(lib_path)
            if built:
                _build(cxx, flags, lib_path)
            lib = _declare(ctypes.CDLL(str(lib_path)))
        except (OSError, AttributeError) as e:  # unwritable/odd cache path, or a bad library
            last_error = e
            continue
        mismatch = abi_mismatch(lib)
        if mismatch and built:
            raise NativeUnavailable(f"the kernel just built from {CSRC} does not match native.py ({mismatch}): "
                                    f"csrc/abi.h and native.py's argument structures must be changed together")
        if mismatch:  # a stale library under this key: built again, in a private folder (a path
            # already loaded in this process would be handed back by the dynamic loader)
            last_error = NativeUnavailable(f"the cached kernel {lib_path} has {mismatch}; rebuilt")
            lib_path.unlink(missing_ok=True)
            continue
        isa = lib.structvit_isa().decode()
        have = cpuinfo.cpu_flags()
        missing = [f for f in ISA_CPU_FLAGS.get(isa, ()) if have and f not in have]
        if missing:
            raise NativeUnavailable(f"the kernel was built for {isa} (STRUCTVIT_NATIVE_ARCH="
                                    f"{config.settings().native_arch!r}) but this CPU lacks {', '.join(missing)}")
        return lib
    raise NativeUnavailable(f"could not build or load the kernel (cache {places[0]}): {last_error}")


_lock = threading.Lock()
_loaded: dict[tuple, ctypes.CDLL | NativeUnavailable] = {}
_warned: set[str] = set()


def _settings_key() -> tuple:
    s = config.settings()
    return (s.native, str(s.cache_dir), s.native_openmp, s.cxx, s.native_arch,
            os.environ.get("STRUCTVIT_NATIVE_SANITIZE", ""))


def load() -> ctypes.CDLL:
    """The loaded kernel library; raises :class:`NativeUnavailable` with the reason.

    Built and loaded once per combination of settings (``structvit.config``)."""
    key = _settings_key()
    with _lock:
        if key not in _loaded:
            try:
                if not config.settings().native:
                    raise NativeUnavailable("disabled (STRUCTVIT_DISABLE_NATIVE, or structvit.config.set_native(False))")
                cxx = compiler()
                flags = FLAGS + arch_flags(config.settings().native_arch) + (
                    OPENMP_FLAGS if shares_torch_openmp() else []) + sanitize_flags()
                digest = hashlib.sha256(source_bytes() + " ".join([cxx] + flags).encode() + cpuinfo.machine_fingerprint().encode())
                _loaded[key] = _load_uncached(cxx, flags, digest.hexdigest()[:16])
            except NativeUnavailable as e:
                _loaded[key] = e
                if config.settings().native and str(e) not in _warned:
                    _warned.add(str(e))
                    warnings.warn(f"structvit: the fused CPU kernel is unavailable, using PyTorch-op backends: {e}",
                                  RuntimeWarning, stacklevel=3)
        result = _loaded[key]
    if isinstance(result, NativeUnavailable):
        raise result
    return result


def available() -> bool:
    """Whether the fused CPU kernel can be used here (builds it on the first call)."""
    try:
        load()
        return True
    except NativeUnavailable:
        return False


def unavailable_reason() -> str | None:
    """Why the kernel is unavailable (None when it is available)."""
    try:
        load()
        return None
    except NativeUnavailable as e:
        return str(e)


def isa_name() -> str | None:
    """The vector ISA the loaded kernel was compiled for: "avx512", "avx2", "neon" or
    "generic"; None when the kernel is unavailable."""
    try:
        return load().structvit_isa().decode()
    except NativeUnavailable:
        return None


def build_isa() -> str | None:
    """The vector ISA the loaded kernel was compiled for ("avx512", "avx2", "neon" or
    "generic") and its float lanes, e.g. "avx2 (8 float lanes)"; None when unavailable."""
    try:
        lib = load()
    except NativeUnavailable:
        return None
    return f"{lib.structvit_isa().decode()} ({lib.structvit_lanes()} float lanes)"


def reset() -> None:
    """Forget loaded libraries and failures (the next call builds or loads again)."""
    with _lock:
        _loaded.clear()
        _warned.clear()


@torch.compiler.assume_constant_result
def available_constant() -> bool:
    """:func:`available`, as a constant under ``torch.compile`` (the library is built on the first call)."""
    return available()


@torch.compiler.assume_constant_result
def isa_constant() -> str:
    """:func:`isa_name`, "" when unavailable; a constant under ``torch.compile``."""
    return isa_name() or ""
