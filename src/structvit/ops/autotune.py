"""The measured choice of "auto": time the backends that can serve a call, once per shape.

Which of the fused kernel, keyconv and the correlation form is fastest depends on the CPU
(vector width, caches, how fast its GEMMs and PyTorch's attention kernel are), so "auto"
does not only trust a cost model: the first time a call of a shape class is seen, every
candidate (the backends that can serve it and fit its memory limit) runs a short
forward (+ backward when training) on random inputs of that shape, and the fastest is
recorded, in memory and in a JSON file per machine under the cache directory, next to
the kernel builds (``<cache>/autotune/<machine>.json``; the machine key covers the CPU
model and flags, the kernel's build target, the torch version and the thread count).

Modes (``structvit.config``, ``STRUCTVIT_AUTOTUNE``):

- ``measure`` (default): as above.
- ``deterministic``: never time anything; use the choices already recorded (in this
  process or in the file), else the cost model. The same inputs then give the same
  backend in every process that sees the same file (e.g. all ranks of a job).
- ``off``: the cost model only (``dispatch.choose_backend``'s rules).

Calls are only measured when that is possible and worth it: real CPU tensors, eager
mode (not while ``torch.compile``/``torch.export`` traces, under fake tensors, a dispatch
mode such as the FLOP counter, or ONNX export; there a recorded choice is still used),
and at least ``MIN_MACS`` multiply-adds, so that small calls (and the test suite's)
never pay for timing. A damaged or foreign cache file is ignored and rewritten.

A shared machine makes timings noisy, so a measurement is built to survive it: the
candidates are timed in rounds, each round in a new (seeded) random order so that they
share the background load, and each keeps its fastest run (the least disturbed one);
when the two fastest are within ``CLOSE`` of each other, more rounds of just those two
follow (up to ``MAX_EXTRA_ROUNDS``). A choice whose rounds disagreed (a candidate's
slowest run more than ``NOISY`` times its fastest) is recorded as noisy and measured
again by the next process that needs it (up to ``MAX_TRIES`` times in all). To start
again, :func:`forget` deletes the recorded choices (``structvit bench autotune --forget``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import threading
import time
from pathlib import Path

import torch

from .. import config
from . import cpuinfo, native, timing
from .backends import BACKENDS

FILE_VERSION = 1
# below this many forward multiply-adds (the cheapest candidate's) the cost model decides:
# a wrong pick costs little there, and timing would cost more than it saves
MIN_MACS = 10 ** 8
REPEATS = 3  # timed runs per candidate after one warm-up; the minimum is kept
CLOSE = 0.05  # two best within 5%: time just those two again
MAX_EXTRA_ROUNDS = 4
NOISY = 1.5  # a candidate's slowest run over its fastest above this: the record is provisional
MAX_TRIES = 3  # measurements of one shape class before a noisy record is kept for good

_lock = threading.Lock()
_memory: dict[str, dict[str, str]] = {}  # machine key -> {shape key: backend}
_file_loaded: set[str] = set()


@dataclasses.dataclass(frozen=True)
class Probe:
    """What a measurement needs of a call: canonical shapes (q (B, h, N, C), v's Cv, the
    patterns (hu, cu, D, kt, kh, kw)), grid, stride, normalisation, dtype, device and
    whether a backward pass will follow."""

    q_shape: tuple[int, ...]
    cv: int
    uk_shape: tuple[int, ...]
    uv_shape: tuple[int, ...]
    grid: tuple[int, int, int]
    stride: tuple[int, int, int]
    normalize: str
    dtype: torch.dtype
    device: str
    training: bool

    def key(self, memory_limit: int | None) -> str:
        dt = str(self.dtype).replace("torch.", "")
        return (f"{dt} q{'x'.join(map(str, self.q_shape))} cv{self.cv} uk{'x'.join(map(str, self.uk_shape))} "
                f"uv{'x'.join(map(str, self.uv_shape))} grid{'x'.join(map(str, self.grid))} "
                f"s{'x'.join(map(str, self.stride))} {self.normalize} {'train' if self.training else 'infer'} "
                f"mem{memory_limit or 0}")


def probe_for(q: torch.Tensor, cv: int, uk: torch.Tensor, uv: torch.Tensor, grid, stride, normalize: str) -> Probe:
    """The probe of a call (q (B, h, N, C); uk, uv canonical (hu, cu, D, kt, kh, kw))."""
    training = torch.is_grad_enabled() and (q.requires_grad or uk.requires_grad or uv.requires_grad)
    return Probe(tuple(q.shape), int(cv), tuple(uk.shape), tuple(uv.shape), tuple(grid), tuple(stride), normalize,
                 q.dtype, q.device.type, bool(training))


_machine_keys: dict[tuple, str] = {}


def machine_key() -> str:
    """Identifies what the timings depend on: CPU model and flags, the kernel's source, build
    target and compiler settings, torch version and thread count (computed once per settings)."""
    s = config.settings()
    memo = (s.native_arch, s.native, s.native_openmp, s.cxx, torch.get_num_threads())
    if memo not in _machine_keys:
        source = native.source_bytes()
        parts = [cpuinfo.machine_fingerprint(), torch.__version__, hashlib.sha256(source).hexdigest(),
                 *map(str, memo)]
        _machine_keys[memo] = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return _machine_keys[memo]


def cache_file(machine: str | None = None) -> Path:
    return config.settings().cache_dir / "autotune" / f"{machine or machine_key()}.json"


def _read_file(path: Path) -> dict[str, dict]:
    """The recorded entries of a cache file ({shape key: {"backend", "tries" if noisy}});
    {} if it is missing, damaged or of another version."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("version") != FILE_VERSION or not isinstance(data.get("choices"), dict):
        return {}
    table = {}
    for k, v in data["choices"].items():
        if isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("backend"), str):
            tries = v.get("tries", 0) if v.get("noisy") else 0
            table[k] = {"backend": v["backend"], "tries": tries if isinstance(tries, int) else 0}
    return table


def _write_file(path: Path, key: str, backend: str, seconds: dict[str, float], noisy: bool = False,
                tries: int = 1) -> None:
    """Add one choice to the file (re-read first, so that other processes' entries stay;
    replaced atomically). An unwritable cache directory only loses the file."""
    try:
        try:
            data = json.loads(path.read_text())
            if not (isinstance(data, dict) and data.get("version") == FILE_VERSION
                    and isinstance(data.get("choices"), dict)):
                raise ValueError("not a cache file")
        except (OSError, ValueError, UnicodeDecodeError):
            data = {"version": FILE_VERSION, "choices": {}}  # damaged or missing: start again
        entry = {"backend": backend, "seconds": seconds}
        if noisy:
            entry.update(noisy=True, tries=tries)
        data["choices"][key] = entry
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(f.name, path)
    except OSError:
        pass


def _entry(key: str, machine: str) -> dict | None:
    """The recorded entry for a shape key (memory, then the machine's file): {"backend",
    "tries"}, tries > 0 for a noisy record read from the file (measured again when it can be)."""
    with _lock:
        table = _memory.setdefault(machine, {})
        if machine not in _file_loaded:
            _file_loaded.add(machine)
            for k, v in _read_file(cache_file(machine)).items():
                table.setdefault(k, v)
        return table.get(key)


def recorded(key: str, machine: str) -> str | None:
    """The recorded choice for a shape key (memory, then the machine's file)."""
    entry = _entry(key, machine)
    return None if entry is None else entry["backend"]


def _record(key: str, machine: str, backend: str, seconds: dict[str, float], noisy: bool, tries: int) -> None:
    # in memory a noisy choice is final (this process measured it; the next one may again)
    with _lock:
        _memory.setdefault(machine, {})[key] = {"backend": backend, "tries": 0}
    _write_file(cache_file(machine), key, backend, seconds, noisy, tries)


def reset() -> None:
    """Forget the choices held in memory (the files stay; they are read again when needed)."""
    with _lock:
        _memory.clear()
        _file_loaded.clear()


def forget(all_machines: bool = False) -> list[Path]:
    """Delete the recorded choices of this machine (its cache file; with ``all_machines``
    every file in ``<cache>/autotune``) and those held in memory, so that "auto" measures
    again. Returns the files deleted."""
    paths = sorted(cache_file().parent.glob("*.json")) if all_machines else [cache_file()]
    removed = []
    with _lock:
        for path in paths:
            try:
                path.unlink()
                removed.append(path)
            except FileNotFoundError:
                pass
        _memory.clear()
        _file_loaded.clear()
    return removed


def can_measure(q: torch.Tensor) -> bool:
    """Whether timing is possible and meaningful now: eager mode on real CPU tensors."""
    from torch._subclasses.fake_tensor import is_fake

    if torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export():
        return False
    if q.device.type != "cpu" or is_fake(q) or type(q) is not torch.Tensor and not isinstance(q, torch.nn.Parameter):
        return False
    # an active dispatch mode (FLOP counter, fake mode, ...) or function mode (a default-device
    # context) would see or redirect the measurement's tensors
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is None and not _get_current_function_mode_stack()


def _inputs(probe: Probe, gen: torch.Generator):
    b, h, n, c = probe.q_shape
    dt, dev = probe.dtype, probe.device

    def rand(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float32) * scale).to(device=dev, dtype=dt)

    q, k = rand(b, h, n, c), rand(b, h, n, c)
    v = rand(b, h, n, probe.cv)
    uk = rand(*probe.uk_shape, scale=math.prod(probe.uk_shape[3:]) ** -0.5)
    uv = rand(*probe.uv_shape, scale=math.prod(probe.uv_shape[3:]) ** -0.5)
    tensors = [q, k, v, uk, uv]
    if probe.training:
        for t in tensors:
            t.requires_grad_()
    return tensors


def timed_rounds(fns: dict, repeats: int = REPEATS, close: float = CLOSE, extra: int = MAX_EXTRA_ROUNDS,
                 clock=time.perf_counter) -> dict[str, list[float]]:
    """All timed runs (seconds) of each zero-argument callable (:func:`.timing.timed_rounds`
    with the autotuner's defaults): one warm-up each, ``repeats`` rounds, then up to
    ``extra`` rounds of the two fastest while they are within ``close``."""
    return timing.timed_rounds(fns, repeats, close=close, extra=extra, clock=clock)


def measure(probe: Probe, candidates: list[str], memory_limit: int | None) -> dict[str, list[float]]:
    """Every timed run (seconds) of one call (forward, + backward when training) of each
    candidate, in interleaved rounds (:func:`timed_rounds`)."""
    gen = torch.Generator().manual_seed(0)
    tensors = _inputs(probe, gen)
    scale = probe.q_shape[-1] ** -0.5

    def run(name: str) -> None:
        with torch.set_grad_enabled(probe.training):
            out, _ = BACKENDS[name](*tensors, probe.grid, probe.stride, probe.normalize, scale, 0.0, False,
                                    memory_limit)
            if probe.training:
                out.sum().backward()
                for t in tensors:
                    t.grad = None

    return timed_rounds({name: (lambda name=name: run(name)) for name in candidates})


def mode() -> str:
    return config.settings().autotune


def choose(probe: Probe, candidates: list[str], rule: str, macs: float, memory_limit: int | None,
           measurable: bool) -> str:
    """The backend for a call: a recorded or newly measured choice among ``candidates``
    (mode ``measure``), a recorded one (``deterministic``), else ``rule`` (the cost model's)."""
    how = mode()
    if how == "off" or len(candidates) < 2:
        return rule
    machine = machine_key()
    key = probe.key(memory_limit)
    entry = _entry(key, machine)
    can_time = how == "measure" and measurable and macs >= MIN_MACS
    # a recorded backend that cannot serve this call now is ignored; a noisy record is
    # measured again (when this call can be timed) until it has been tried MAX_TRIES times
    if entry is not None and entry["backend"] in candidates and not (can_time and 0 < entry["tries"] < MAX_TRIES):
        return entry["backend"]
    if not can_time:
        return entry["backend"] if entry is not None and entry["backend"] in candidates else rule
    runs = measure(probe, candidates, memory_limit)
    seconds = {name: min(runs[name]) for name in candidates}
    best = min(candidates, key=lambda name: seconds[name])
    noisy = any(max(runs[name]) > NOISY * min(runs[name]) for name in candidates)
    tries = (entry["tries"] if entry is not None else 0) + 1
    _record(key, machine, best, seconds, noisy, tries)
    return best
