"""What this CPU is: its model name, feature flags and the vector extensions the kernels use.

Read once per process from Linux's ``/proc/cpuinfo`` (the first processor's entry; every
core of a machine reports the same flags), with ``lscpu`` for the model name where
``/proc/cpuinfo`` has none (e.g. some ARM kernels). Elsewhere the flags are empty and the
model is "unknown", which callers treat as "cannot tell", not as "has nothing".
"""
from __future__ import annotations

import functools
import os
import platform
import subprocess

# the vector extensions the CPU kernels choose between (csrc/vec.h)
ISA_EXTENSIONS = ("avx512f", "avx2", "fma")


@functools.lru_cache(maxsize=1)
def _first_processor() -> dict[str, str]:
    """The fields of the first processor's entry in /proc/cpuinfo ({} where unreadable)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if fields:  # the blank line that ends the first entry
                        break
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return {}
    return fields


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (x86 ``flags``, ARM ``Features``); empty where unknown."""
    fields = _first_processor()
    return frozenset((fields.get("flags") or fields.get("Features") or "").split())


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name ("unknown" when neither /proc/cpuinfo nor lscpu gives one)."""
    model = _first_processor().get("model name")
    if model:
        return model
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip() or "unknown"
    return "unknown"


def isa_extensions() -> dict[str, bool]:
    """Which of the vector extensions the kernels use (:data:`ISA_EXTENSIONS`) this CPU has."""
    flags = cpu_flags()
    return {name: name in flags for name in ISA_EXTENSIONS}


def machine_fingerprint() -> str:
    """One string naming what compiled code and timings depend on: the architecture, the
    CPU model and its flags. Part of the kernel cache's and the autotuner's keys."""
    return "\n".join([platform.machine(), cpu_model(), " ".join(sorted(cpu_flags()))])


def logical_cpus() -> int:
    """The number of logical CPUs (1 when the platform does not say)."""
    return os.cpu_count() or 1
