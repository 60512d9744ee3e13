"""What the op and model benchmarks share: the machine line, peak memory, the interleaved
timer's medians and GPU kernel time from the profiler."""
from __future__ import annotations

import gc
import statistics
from typing import Callable

import torch

from .. import config
from ..ops import cpuinfo
from ..ops.timing import timed_rounds

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
# the kernels of StructSA's pattern convolutions and the backbone's depthwise convolutions, by
# name: the Triton ones (pattern_conv_*, depthwise_*) and PyTorch's native depthwise kernels
CONV_KERNEL_WORDS = ("pattern_conv", "depthwise", "dwconv")
# the operators scaled_dot_product_attention dispatches to (forward and backward)
SDPA_PREFIX = "aten::_scaled_dot_product"


def cpu_info() -> dict:
    """The CPU's model name, which of the ISA extensions the kernels care about it has, and its
    logical CPUs: ``{"model", "isa", "cpus"}`` (from :mod:`structvit.ops.cpuinfo`)."""
    return {"model": cpuinfo.cpu_model(), "isa": cpuinfo.isa_extensions(), "cpus": cpuinfo.logical_cpus()}


def kernel_build_line() -> str:
    """The kernels' build and switches: the CPU kernels' vector ISA, the build target, how
    "auto" chooses, whether keyconv uses its CPU kernel and whether CUDA uses the Triton
    kernels (STRUCTVIT_NATIVE_ARCH, STRUCTVIT_AUTOTUNE, STRUCTVIT_NATIVE_CONV, STRUCTVIT_TRITON)."""
    from ..ops import native

    s = config.settings()
    build = native.build_isa() or f"unavailable ({native.unavailable_reason()})"
    return (f"CPU kernels' build {build}, STRUCTVIT_NATIVE_ARCH={s.native_arch}, STRUCTVIT_AUTOTUNE={s.autotune}, "
            f"STRUCTVIT_NATIVE_CONV={int(s.native_conv)}, STRUCTVIT_TRITON={int(s.triton)}")


def gpu_line(device: torch.device) -> str:
    """The GPU and the Triton version, or "" off CUDA."""
    if device.type != "cuda":
        return ""
    try:
        import triton

        version = f"Triton {triton.__version__}"
    except ImportError:
        version = "no Triton"
    return f"GPU {torch.cuda.get_device_name(device)} ({version}, CUDA {torch.version.cuda})"


def machine_line(device: torch.device) -> str:
    """One line naming the machine: CPU model, ISA flags, cores, threads; the GPU if any."""
    info = cpu_info()
    isa = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in info["isa"].items())
    line = f"CPU {info['model']} ({info['cpus']} logical CPUs; {isa}), {torch.get_num_threads()} torch threads"
    line += f"; {kernel_build_line()}"
    if device.type == "cuda":
        line += f"; {gpu_line(device)}"
    return line


def _read_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory growth of a block: CUDA allocator peak, or the CPU resident-set high-water mark."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak: int | None = None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
            self.start = _read_status("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            hwm = _read_status("VmHWM")
            self.peak = None if hwm is None or self.start is None else max(hwm - self.start, 0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(fns: dict, repeats: int, device: torch.device, warmup: int = 1, stat: str = "median") -> dict:
    """Median (``stat="min"``: minimum) wall-clock seconds of each zero-argument callable, timed
    in interleaved rounds (:func:`structvit.ops.timing.timed_rounds`: their ratios survive a busy
    machine)."""
    times = timed_rounds(fns, repeats, warmup=warmup, sync=lambda: sync(device))
    reduce = min if stat == "min" else statistics.median
    return {name: reduce(t) for name, t in times.items()}


def _device_time_us(event) -> float:
    """Device time (us) of a profiler operator event, its children's kernels included."""
    for name in ("device_time_total", "cuda_time_total"):
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def _outermost(events, prefix: str):
    """The operator events named ``prefix...`` that are not inside another such event."""
    for e in events:
        if not e.name.startswith(prefix):
            continue
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith(prefix):
            parent = parent.cpu_parent
        if parent is None:
            yield e


def split_kernel_time(kernels: list[tuple[str, float]], sdpa_us: float) -> dict[str, float]:
    """Seconds of GPU time from (kernel name, us) pairs: ``total``, ``conv`` (the pattern and
    depthwise convolution kernels, :data:`CONV_KERNEL_WORDS`) and ``sdpa`` (given: the device
    time of the SDPA operators)."""
    total = sum(us for _, us in kernels)
    conv = sum(us for name, us in kernels if any(w in name.lower() for w in CONV_KERNEL_WORDS))
    return {"total": total / 1e6, "conv": conv / 1e6, "sdpa": sdpa_us / 1e6}


def gpu_kernel_time(fn: Callable[[], object], device: torch.device, calls: int = 3) -> dict[str, float]:
    """Mean GPU time per call of ``fn`` (warmed up) under the torch profiler: every kernel,
    memcpy and memset the calls ran, in seconds, split as :func:`split_kernel_time` does.
    Launch overhead and host time are not in it (the wall-clock is measured beside it)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    events = prof.events()
    kernels = [(e.name, e.time_range.elapsed_us()) for e in events if e.device_type == DeviceType.CUDA]
    sdpa = sum(_device_time_us(e) for e in _outermost(events, SDPA_PREFIX))
    return {k: v / calls for k, v in split_kernel_time(kernels, sdpa).items()}
