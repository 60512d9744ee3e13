"""Benchmarks: ``python -m structvit.bench op|model`` (or ``structvit bench op|model``).

Times forward + backward of every StructSA backend and of plain attention
(``scaled_dot_product_attention``, "SA") on the same inputs in the same run, and
prints each as a ratio to SA (absolute times on a shared CPU are noisy; ratios
measured side by side are not). Peak memory is the growth of the process's
resident set (CPU: /proc VmHWM, reset before each measurement) or the CUDA
allocator's peak, also as a ratio to SA.
"""
from __future__ import annotations

import argparse
import functools
import gc
import math
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import config
from .ops import resolve_backend, struct_attention


DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class OpCase:
    name: str
    batch: int
    heads: int
    head_dim: int
    grid: tuple[int, ...]
    window: tuple[int, ...]
    patterns: int
    normalize: str = "joint"
    layout: str = "head"  # "channel" (the paper's), "head" or "shared": see struct_attention
    kv_stride: tuple[int, ...] | int = 1

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def stride3(self) -> tuple[int, int, int]:
        s = (self.kv_stride,) * len(self.grid) if isinstance(self.kv_stride, int) else tuple(self.kv_stride)
        return (1,) * (3 - len(s)) + s

    @property
    def keys(self) -> int:
        """N': key/value positions on the strided grid."""
        grid3 = (1,) * (3 - len(self.grid)) + tuple(self.grid)
        return math.prod(-(-n // s) for n, s in zip(grid3, self.stride3))


def _paper_case(kind: str, d: int, stride: int) -> OpCase:
    """The paper's form: channel-wise StructSA, D patterns, key/value stride 1 or 2 (video (1, s, s))."""
    if kind == "image":  # stage 3 of StructViT-S at 224x224: 14x14 tokens, 5 heads of 64
        return OpCase(f"image 14x14, 3x3, channel-wise D={d}, stride {stride}", 16, 5, 64, (14, 14), (3, 3), d,
                      layout="channel", kv_stride=stride)
    return OpCase(f"video 8x14x14, 3x3x3, channel-wise D={d}, stride (1, {stride}, {stride})", 2, 5, 64, (8, 14, 14),
                  (3, 3, 3), d, layout="channel", kv_stride=(1, stride, stride))


OP_CASES = {
    # the paper's StructSA: channel-wise patterns, D = 4 or 8, stride 1 or 2
    **{f"{kind}_c{d}_s{s}": _paper_case(kind, d, s) for kind in ("image", "video") for d in (4, 8) for s in (1, 2)},
    # the dot-product variant (per-head patterns), which the correlation and fused backends serve
    "image": OpCase("image 14x14, 3x3, per-head D=8", 16, 5, 64, (14, 14), (3, 3), 8),
    "video": OpCase("video 8x14x14, 3x3x3, per-head D=8", 2, 5, 64, (8, 14, 14), (3, 3, 3), 8),
    "video155": OpCase("video 8x14x14, 1x5x5, per-head D=8", 2, 5, 64, (8, 14, 14), (1, 5, 5), 8),
    # grids where the fused kernel cannot take its block-row transposed convolution
    "image7": OpCase("image 7x7 (stage 4), 3x3, per-head D=8", 16, 8, 64, (7, 7), (3, 3), 8),
    "video555": OpCase("video 8x14x14, 5x5x5, per-head D=8", 2, 5, 64, (8, 14, 14), (5, 5, 5), 8),
    "tiny": OpCase("tiny 2x4x4, 3x3x3, per-head D=2 (smoke test)", 1, 2, 8, (2, 4, 4), (3, 3, 3), 2),
    "tiny_c": OpCase("tiny 2x4x4, 3x3x3, channel-wise D=2, stride (1, 2, 2) (smoke test)", 1, 2, 8, (2, 4, 4),
                     (3, 3, 3), 2, layout="channel", kv_stride=(1, 2, 2)),
}
PAPER_CASES = [f"{kind}_c{d}_s{s}" for kind in ("image", "video") for d in (4, 8) for s in (1, 2)]


def cpu_info() -> dict:
    """The CPU's model name (lscpu, else /proc/cpuinfo) and which of the ISA extensions the
    kernels care about (avx512f, avx2, fma) its flags list."""
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = val.strip()
                elif key == "flags" and not flags:
                    flags = set(val.split())
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
                break
    except (OSError, subprocess.SubprocessError):
        pass
    return {"model": model or "unknown", "isa": {f: f in flags for f in ("avx512f", "avx2", "fma")},
            "cpus": os.cpu_count()}


def machine_line(device: torch.device) -> str:
    """One line naming the machine: CPU model, ISA flags, cores, threads; the GPU if any."""
    info = cpu_info()
    isa = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in info["isa"].items())
    line = f"CPU {info['model']} ({info['cpus']} logical CPUs; {isa}), {torch.get_num_threads()} torch threads"
    line += f"; {kernel_build_line()}"
    if device.type == "cuda":
        line += f"; GPU {torch.cuda.get_device_name(device)}"
    return line


def kernel_build_line() -> str:
    """The CPU kernels' build: its vector ISA and lanes, the build target setting, how
    "auto" chooses and whether keyconv uses its kernel (STRUCTVIT_NATIVE_ARCH,
    STRUCTVIT_AUTOTUNE, STRUCTVIT_NATIVE_CONV)."""
    from .ops import native

    s = config.settings()
    build = native.build_isa() or f"unavailable ({native.unavailable_reason()})"
    return (f"CPU kernels' build {build}, STRUCTVIT_NATIVE_ARCH={s.native_arch}, STRUCTVIT_AUTOTUNE={s.autotune}, "
            f"STRUCTVIT_NATIVE_CONV={int(s.native_conv)}")


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_op_inputs(case: OpCase, device: torch.device, dtype: torch.dtype):
    """q, k, v (B, heads, N, C) and patterns u_k, u_v in the case's layout, all requiring grad."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = (case.batch, case.heads, case.tokens, case.head_dim)
    qkv = [torch.randn(shape, generator=gen).to(device, dtype).requires_grad_() for _ in range(3)]
    lead = {"channel": (case.heads, case.head_dim), "head": (case.heads,), "shared": ()}[case.layout]
    pshape = lead + (case.patterns,) + case.window
    scale = math.prod(case.window) ** -0.5
    us = [(torch.randn(pshape, generator=gen) * scale).to(device, dtype).requires_grad_() for _ in range(2)]
    return qkv, us


def op_fn(case: OpCase, backend: str, memory_limit: int | None = None):
    """The function benchmarked for a backend ("sa" is plain scaled_dot_product_attention;
    "auto-mem" is "auto" told to keep its working memory under ``memory_limit`` bytes)."""
    if backend == "sa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    if backend == "keyconv-torch":
        return functools.partial(_keyconv_with_torch_convolutions, case)
    limit = memory_limit if backend == "auto-mem" else None
    backend = "auto" if backend == "auto-mem" else backend
    return lambda q, k, v, u_k, u_v: struct_attention(q, k, v, u_k, u_v, case.grid, kv_stride=case.kv_stride,
                                                      normalize=case.normalize, backend=backend, memory_limit=limit)


def _keyconv_with_torch_convolutions(case: OpCase, q, k, v, u_k, u_v):
    """keyconv with PyTorch's convolutions instead of its own kernel (``set_native_conv(False)``
    for the call; the backward runs on what the forward recorded)."""
    saved = config.settings().native_conv
    config.set_native_conv(False)
    try:
        return struct_attention(q, k, v, u_k, u_v, case.grid, kv_stride=case.kv_stride, normalize=case.normalize,
                                backend="keyconv")
    finally:
        config.set_native_conv(saved)


def peak_memory_in_subprocess(case_key: str, normalize: str, backend: str, device: str, dtype: str,
                              memory_limit: int | None = None) -> int | None:
    """Peak memory of one fwd+bwd, measured in a fresh process.

    A fresh process has no allocator caches from earlier measurements, and with a
    fixed mmap threshold every large buffer is returned to the OS when freed, so the
    resident-set high-water mark follows the live tensors.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    cmd = [sys.executable, "-m", "structvit.bench", "_peak", case_key, normalize, backend, device, dtype,
           str(memory_limit or 0)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"peak-memory measurement failed for {backend} on {case_key}:\n{res.stderr[-2000:]}")
    value = res.stdout.strip().splitlines()[-1]
    return None if value == "None" else int(value)


def _peak_main(case_key: str, normalize: str, backend: str, device: str, dtype: str, memory_limit: str = "0") -> int:
    case = OpCase(**{**OP_CASES[case_key].__dict__, "normalize": normalize})
    dev = torch.device(device)
    (q, k, v), (u_k, u_v) = make_op_inputs(case, dev, DTYPES[dtype])
    inputs = (q, k, v) if backend == "sa" else (q, k, v, u_k, u_v)
    with PeakMemory(dev) as mem:
        op_fn(case, backend, int(memory_limit) or None)(*inputs).float().sum().backward()
    print(mem.peak)
    return 0


def interleaved_medians(fns: dict, repeats: int, device: torch.device, warmup: int = 1, stat: str = "median") -> dict:
    """Median (``stat="min"``: minimum) seconds of each zero-argument callable, timed in rounds.

    Timing the candidates in turn, round after round, exposes them to the same
    background load, so their ratios stay meaningful on a busy machine. Each round takes
    them in a new random order (seeded, so runs repeat): a candidate that leaves freed
    memory to be page-faulted in again or cold caches then slows a different successor
    each round, not always the same one. (Rotating a fixed order does not do that: every
    candidate but one keeps its predecessor. Measured: the fused row 7.3x SA against 6.0x
    for the identical auto row, both right after keyconv and correlation in 6 of 7 rounds.)
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    order = random.Random(0)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        order.shuffle(names)
        for name in names:
            fn = fns[name]
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    reduce = min if stat == "min" else statistics.median
    return {name: reduce(t) for name, t in times.items()}


def profile_breakdown(fn, top: int) -> list[tuple[str, float]]:
    """Where one call of ``fn`` spends its time: the ``top`` operators by self CPU time
    (torch profiler), in seconds, and the rest summed as "other"."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    events = sorted(((e.key, e.self_cpu_time_total / 1e6) for e in prof.key_averages()), key=lambda kv: -kv[1])
    rest = sum(t for _, t in events[top:])
    return events[:top] + ([("other", rest)] if rest > 0 else [])


def bench_op_case(case_key: str, case: OpCase, backends: list[str], *, device: str, dtype: str, repeats: int,
                  naive_limit: int = 2 << 30, memory_limit: int = 8 << 20, measure_memory: bool = True,
                  stat: str = "median", profile_top: int = 0) -> list[dict]:
    """Rows of {backend, seconds, peak bytes, ratios} for one shape, SA first (peak None
    without ``measure_memory``: each measurement is a fresh process, seconds each; with
    ``profile_top`` each row also gets its ``profile_breakdown``)."""
    dev = torch.device(device)
    (q, k, v), (u_k, u_v) = make_op_inputs(case, dev, DTYPES[dtype])
    m = math.prod(case.window)
    auto, auto_mem = (resolve_backend(q, u_k, case.grid, u_v=u_v, kv_stride=case.kv_stride, memory_limit=lim)
                      for lim in (None, memory_limit))
    labels, fns, skipped = {}, {}, {}
    for backend in ["sa"] + backends:
        label = {"sa": "SA (sdpa)", "auto": f"auto ({auto})", "keyconv-torch": "keyconv (PyTorch convolutions)",
                 "auto-mem": f"auto, memory_limit {memory_limit / 2**20:g} MiB ({auto_mem})"}.get(backend, backend)
        labels[backend] = label
        if backend not in ("sa", "auto", "auto-mem", "keyconv-torch"):
            try:
                resolve_backend(q, u_k, case.grid, u_v=u_v, kv_stride=case.kv_stride, backend=backend)
            except ValueError as err:  # correlation / fused: dot-product layouts at stride 1 only
                reason = str(err).split(": ", 1)[-1]
                if "channel-wise" in reason:
                    reason = "channel-wise patterns"
                elif "kv_stride" in reason:
                    reason = "kv_stride > 1"
                skipped[backend] = f"cannot serve {reason}"
                continue
        if backend == "naive":
            need = case.batch * case.heads * (case.keys * m * case.head_dim * 2 + 2 * case.tokens * case.patterns
                                              * case.keys) * q.element_size() * 2
            if need > naive_limit:
                skipped[backend] = f"needs ~{need / 2**30:.0f} GiB"
                continue
        inputs = (q, k, v) if backend == "sa" else (q, k, v, u_k, u_v)
        fns[backend] = (lambda fn=op_fn(case, backend, memory_limit), inputs=inputs:
                        fn(*inputs).float().sum().backward())
    seconds = interleaved_medians(fns, repeats, dev, stat=stat)
    rows = []
    for backend, label in labels.items():
        if backend in skipped:
            rows.append({"backend": label, "skipped": skipped[backend]})
            continue
        peak = (peak_memory_in_subprocess(case_key, case.normalize, backend, device, dtype, memory_limit)
                if measure_memory else None)
        rows.append({"backend": label, "seconds": seconds[backend], "peak": peak, "auto": backend.startswith("auto")})
        if profile_top and device == "cpu":
            rows[-1]["profile"] = profile_breakdown(fns[backend], profile_top)
    sa = rows[0]
    # the fastest explicit backend of the run, for the auto rows' "x fastest"
    fastest = min((r["seconds"] for r in rows[1:] if "seconds" in r and not r["auto"]), default=None)
    for row in rows:
        if "seconds" in row:
            row["time_ratio"] = row["seconds"] / sa["seconds"]
            row["mem_ratio"] = row["peak"] / sa["peak"] if row["peak"] and sa["peak"] else None
            if row["auto"] and fastest:
                row["fastest_ratio"] = row["seconds"] / fastest
    return rows


def _fmt_mem(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:.0f} MiB"


def format_op_table(case: OpCase, rows: list[dict]) -> str:
    keys = f", N'={case.keys} keys" if case.keys != case.tokens else ""
    lines = [f"### {case.name}: B={case.batch}, heads={case.heads}, C={case.head_dim}, N={case.tokens}{keys}, "
             f"{case.normalize}",
             "", "| backend | fwd+bwd | x SA | peak memory | x SA |", "|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['backend']} | skipped ({r['skipped']}) | | | |")
            continue
        mr = "n/a" if r["mem_ratio"] is None else f"{r['mem_ratio']:.1f}x"
        lines.append(f"| {r['backend']} | {r['seconds'] * 1e3:.1f} ms | {r['time_ratio']:.2f}x | {_fmt_mem(r['peak'])} | {mr} |")
    auto = [r for r in rows if "fastest_ratio" in r]
    if auto:
        lines += [""] + [f"{r['backend']}: {r['fastest_ratio']:.2f}x the fastest explicit backend "
                         f"({'within' if r['fastest_ratio'] <= 1.1 else 'NOT within'} 10%)" for r in auto]
    profiled = [r for r in rows if r.get("profile")]
    if profiled:
        sa_seconds = rows[0]["seconds"]
        lines += ["", "Where the time goes (one fwd+bwd under the torch profiler, self CPU time, in units of the "
                  "SA row's time):", "", "| backend | operator | x SA |", "|---|---|---|"]
        for r in profiled:
            lines += [f"| {r['backend']} | {name} | {t / sa_seconds:.2f} |" for name, t in r["profile"]]
    return "\n".join(lines)


def run_op(args) -> int:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    header = [f"# StructSA op benchmark: forward+backward, {args.dtype}, device={device}"
              f"{'' if device.type == 'cuda' else f', {torch.get_num_threads()} threads'}, torch {torch.__version__}",
              f"# machine: {machine_line(device)}",
              "# ratios are to SA (scaled_dot_product_attention) measured in the same run"]
    print("\n".join(header) + "\n", flush=True)
    tables = []
    for name in args.cases:
        case = OP_CASES[name]
        if args.normalize != "joint":
            case = OpCase(**{**case.__dict__, "normalize": args.normalize})
        rows = bench_op_case(name, case, args.backends, device=args.device, dtype=args.dtype, repeats=args.repeats,
                             memory_limit=int(args.memory_limit * 2**20), measure_memory=not args.no_memory,
                             stat=args.stat, profile_top=args.profile)
        tables.append(format_op_table(case, rows))
        print(tables[-1], "\n", flush=True)
    if args.write:
        write_performance(args.write, tables, device, argv=getattr(args, "argv", None), stat=args.stat)
        print(f"wrote {args.write}")
    return 0


def write_performance(path, tables: list[str], device: torch.device, argv: list[str] | None = None,
                      stat: str = "median") -> None:
    """Write the op tables to ``path`` (Markdown) with the command, machine, ISA and date."""
    import datetime
    import shlex
    from pathlib import Path

    cmd = "python -m structvit.bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    info = cpu_info()
    isa = ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in info["isa"].items())
    lines = ["# Performance: the StructSA op against plain attention", "",
             "Forward + backward of `struct_attention` and of `scaled_dot_product_attention` (SA) on the same",
             f"inputs, timed interleaved in one run ({'minimum' if stat == 'min' else 'median'} over rounds); "
             "ratios are to SA. Peak memory is",
             "measured in a fresh process per row (see `structvit.bench`). \"x the fastest explicit backend\" is",
             "an auto row's time over the fastest of the backend rows of the same run.", "",
             f"- load average when written (1, 5, 15 min): {', '.join(f'{x:.2f}' for x in os.getloadavg())}",
             f"- command: `{cmd}`",
             f"- date: {datetime.date.today().isoformat()}",
             f"- machine: {info['model']}, {info['cpus']} logical CPUs, {torch.get_num_threads()} torch threads"
             + (f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
             f"- ISA: {isa}",
             f"- {kernel_build_line()}",
             f"- torch {torch.__version__}, device {device}", ""]
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("\n".join(lines) + "\n" + "\n\n".join(tables) + "\n")


# ----------------------------------------------------------------------------- model level


def _model(name: str, **kwargs):
    import timm

    from . import models  # noqa: F401  (registers the StructViT models)

    return timm.create_model(name, **kwargs)


def _sa_kwargs(model) -> dict:
    """The keyword arguments that give ``model``'s family SA in every attention block
    (UniFormer for the StructViT family, DeiT for the DeiT-style one)."""
    return {"struct_blocks": (0, 0)} if hasattr(model, "struct_blocks") else {"attention": "sa"}


def _pair(name: str, backend: str) -> dict:
    """The registered model with StructSA in every attention block, and the same model with
    SA in every block: {"all": model, "sa": model}."""
    struct = _model(name, backend=backend)
    if hasattr(struct, "struct_blocks") and tuple(struct.struct_blocks) != tuple(struct.depths[2:]):
        struct = _model(name, backend=backend, struct_blocks="all")  # a registered partial variant
    return {"all": struct, "sa": _model(name, **_sa_kwargs(struct))}


def train_step_fn(model, shape, device: torch.device):
    """One forward + backward + AdamW step of ``model`` on random data of ``shape``."""
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(shape, device=device)
    y = torch.randint(0, model.num_classes, (shape[0],), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def inference_fn(model, shape, device: torch.device):
    """One no-grad eval forward pass of ``model`` on random data of ``shape``."""
    model.to(device).eval()
    x = torch.randn(shape, device=device)

    def fwd():
        with torch.no_grad():
            model(x)

    return fwd


def backends_used(model) -> str:
    """The StructSA backends the model's last forward ran, e.g. "fused x4, keyconv x1"."""
    from collections import Counter

    from .nn import StructSA

    used = Counter(m.last_backend for m in model.modules() if isinstance(m, StructSA) and m.last_backend)
    return ", ".join(f"{name} x{count}" for name, count in sorted(used.items())) or "-"


# the paper's StructViT-S at both strides, image and video, against UniFormer-S (all SA)
TRAIN_MODELS = ("structvit_s_4_1", "structvit_s_4_2", "structvit_s_4_1_video", "structvit_s_4_2_video")


def sdpa_share(fn, device: torch.device) -> float:
    """The fraction of one call of ``fn`` (a warmed-up training step or inference pass) spent
    in ``scaled_dot_product_attention``'s forward and backward kernels (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        total = time.perf_counter() - t0
    # aten::_scaled_dot_product_{flash_attention_for_cpu,efficient_attention,...}[_backward]: the
    # kernels SDPA dispatches to, each counted once with what it calls (the public wrapper
    # aten::scaled_dot_product_attention has no leading underscore and is not counted again)
    attention = sum(e.cpu_time_total for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")) / 1e6
    return min(1.0, attention / total)


def attention_floor(sa_fn, model, device: torch.device) -> tuple[float, float]:
    """(SDPA share of ``sa_fn``, the all-SA version's call, and the floor it sets for
    ``model``): the ratio ``model`` would reach if its StructSA cost exactly SDPA over
    D * N' keys, 1 + share * (D * N' / N - 1)."""
    share = sdpa_share(sa_fn, device)
    return share, 1 + share * (key_factor(model) - 1)


def key_factor(model) -> float:
    """D * N' / N, how many more keys StructSA's SDPA sees than plain attention, averaged
    over the model's StructSA layers (the registered models give all of them the same D
    and stride; the stride-2 models: about D / 4)."""
    from .nn import StructSA

    layers = [m for m in model.modules() if isinstance(m, StructSA)]
    if not layers:
        return 1.0
    factors = []
    for m in layers:
        keep = math.prod(1 / s for s in m.kv_stride)  # N' / N up to the rounding of ceil(n / s)
        factors.append(m.num_patterns * keep)
    return sum(factors) / len(factors)


def run_model(args) -> int:
    """Each StructSA model is timed against the same model with all-SA blocks, the two
    interleaved step by step (``interleaved_medians``): measured one after the other,
    the ratio of the image training step read anywhere from 0.8x to 1.15x between runs."""
    from .models import MODEL_NAMES
    from .models.summary import default_input_shape

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# machine: {machine_line(device)}")
    print(f"# StructViT model benchmark: device={device}"
          f"{'' if device.type == 'cuda' else f', {torch.get_num_threads()} threads'}, torch {torch.__version__}, "
          f"backend={args.backend}, median of {args.repeats} interleaved rounds\n")
    if "train" in args.what:
        print("### Training step (fwd + bwd + AdamW), StructSA in every attention block vs SA in every block\n")
        print("The floor: the all-SA step with its SDPA time (forward + backward, profiled) multiplied by the "
              "keys' factor D * N' / N, the least StructSA's attention can cost (SDPA over D * N' keys).\n")
        print("| model | input | SA step | StructSA step | x SA | SDPA share of the SA step | floor | x floor "
              "| StructSA backends (auto) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name in args.models or TRAIN_MODELS:
            models = _pair(name, args.backend)
            batch = args.video_batch if getattr(models["all"], "video", False) else args.image_batch
            shape = default_input_shape(models["all"], batch)
            steps = {b: train_step_fn(m, shape, device) for b, m in models.items()}
            times = interleaved_medians(steps, args.repeats, device)
            share, floor = attention_floor(steps["sa"], models["all"], device)
            used = backends_used(models["all"])
            del models, steps
            shape_s = "x".join(map(str, shape[1:]))
            ratio = times["all"] / times["sa"]
            print(f"| {name} | {batch}x{shape_s} | {times['sa']:.2f} s | {times['all']:.2f} s | {ratio:.2f}x | "
                  f"{share:.1%} | {floor:.2f}x | {ratio / floor:.2f} | {used} |", flush=True)
        print()
    if "infer" in args.what:
        print("### Inference throughput (eval, no grad), each model vs the same model with all-SA\n")
        print("| model | input | StructSA blocks | samples/s | all-SA samples/s | x SA time | SDPA share of the SA pass "
              "| floor | x floor | StructSA backends (auto) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name in args.models or MODEL_NAMES:
            model = _model(name, backend=args.backend)
            batch = args.video_batch if getattr(model, "video", False) else args.image_batch
            shape = default_input_shape(model, batch)
            fns = {"struct": inference_fn(model, shape, device),
                   "sa": inference_fn(_model(name, **_sa_kwargs(model)), shape, device)}
            times = interleaved_medians(fns, args.repeats, device)
            t, t_sa = times["struct"], times["sa"]
            share, floor = attention_floor(fns["sa"], model, device)
            blocks = getattr(model, "struct_blocks", "all")  # the DeiT-style models: every block
            used = backends_used(model)
            del model, fns
            shape_s = "x".join(map(str, shape[1:]))
            print(f"| {name} | {batch}x{shape_s} | {blocks} | {batch / t:.2f} | {batch / t_sa:.2f} | {t / t_sa:.2f}x | "
                  f"{share:.1%} | {floor:.2f}x | {t / t_sa / floor:.2f} | {used} |", flush=True)
    return 0


def run_autotune(args) -> int:
    """Show (default) or delete (``--forget``) the choices "auto" recorded on this machine."""
    import json

    from .ops import autotune

    print(f"# machine: {machine_line(torch.device('cpu'))}")
    path = autotune.cache_file()
    if args.forget:
        removed = autotune.forget(all_machines=args.all)
        print("\n".join(f"deleted {p}" for p in removed) or f"nothing recorded ({path} does not exist)")
        return 0
    entries = autotune._read_file(path)
    print(f"# {len(entries)} recorded choices in {path}")
    if entries:
        data = json.loads(path.read_text())["choices"]
        print("| shape class | backend | seconds per candidate | noisy |\n|---|---|---|---|")
        for key, entry in sorted(data.items()):
            secs = ", ".join(f"{name} {t * 1e3:.1f} ms" for name, t in sorted(entry.get("seconds", {}).items()))
            noisy = f"yes ({entry.get('tries', 1)} tries)" if entry.get("noisy") else "no"
            print(f"| {key} | {entry.get('backend')} | {secs} | {noisy} |")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="structvit bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    op = sub.add_parser("op", help="StructSA backends vs SA, fwd+bwd time and peak memory")
    op.add_argument("--cases", nargs="+", default=PAPER_CASES, choices=sorted(OP_CASES),
                    help="default: the paper's channel-wise cases (image/video, D=4/8, stride 1/2)")
    op.add_argument("--backends", nargs="+", default=["naive", "correlation", "keyconv", "fused", "auto", "auto-mem"],
                    choices=["naive", "correlation", "keyconv", "keyconv-torch", "fused", "auto", "auto-mem"],
                    help="auto-mem: auto with --memory-limit; keyconv-torch: keyconv with PyTorch's convolutions "
                         "instead of its kernel (STRUCTVIT_NATIVE_CONV=0)")
    op.add_argument("--profile", type=int, default=0, metavar="TOP",
                    help="also profile one fwd+bwd of every row and list its TOP operators by self CPU time")
    op.add_argument("--memory-limit", type=float, default=8.0,
                    help="working-memory limit in MiB given to auto for the auto-mem row (default 8)")
    op.add_argument("--normalize", default="joint", choices=["joint", "per_pattern"])
    op.add_argument("--device", default="cpu")
    op.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    op.add_argument("--repeats", type=int, default=5)
    op.add_argument("--stat", default="median", choices=["median", "min"],
                    help="per backend: the median or the minimum over the interleaved rounds (min: the least "
                         "disturbed run, for a loaded machine)")
    op.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    op.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements (one process each)")
    op.add_argument("--write", default=None, metavar="PATH",
                    help="also write the tables to PATH (e.g. docs/results/performance.md) with command, machine, ISA, date")
    op.set_defaults(func=run_op)
    model = sub.add_parser("model", help="training-step time vs all-SA, and inference throughput of registered models")
    model.add_argument("--what", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    model.add_argument("--models", nargs="+", default=None, help="registered names (default: all)")
    model.add_argument("--image-batch", type=int, default=4)
    model.add_argument("--video-batch", type=int, default=1)
    model.add_argument("--backend", default="auto", help="StructSA backend of the models")
    model.add_argument("--device", default="cpu")
    model.add_argument("--repeats", type=int, default=3)
    model.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    model.set_defaults(func=run_model)
    tune = sub.add_parser("autotune", help="the backend choices 'auto' measured and recorded on this machine")
    tune.add_argument("--forget", action="store_true", help="delete them, so that 'auto' measures again")
    tune.add_argument("--all", action="store_true", help="with --forget: the records of every machine key "
                      "(other thread counts, kernel builds, torch versions), not only the current one")
    tune.set_defaults(func=run_autotune)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_peak"]:  # internal: one peak-memory measurement (see peak_memory_in_subprocess)
        return _peak_main(*argv[1:])
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
