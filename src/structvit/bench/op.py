"""``bench op``: forward + backward of every StructSA backend against SA on the same inputs.

Each backend and plain attention (``scaled_dot_product_attention``, "SA") are timed on the
same inputs in the same run (interleaved rounds) and reported as ratios to SA. Peak memory is
the growth of the process's resident set (CPU: /proc VmHWM, reset before each measurement, in
a fresh process per row) or the CUDA allocator's peak. On CUDA each row also gets its GPU
kernel time (torch profiler; the wall-clock beside it is launch-bound on a fast GPU), the
share of it in the pattern convolutions' kernels, and the "SA over D * N' keys" row: SDPA
with as many keys as StructSA's attention sees, the floor of what StructSA can cost.
"""
from __future__ import annotations

import datetime
import functools
import math
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import config
from ..ops import resolve_backend, struct_attention
from .common import DTYPES, PeakMemory, cpu_info, gpu_kernel_time, gpu_line, interleaved_medians, kernel_build_line
from .common import machine_line


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


def _paper_case(kind: str, d: int, stride: int, image_batch: int = 16, video_batch: int = 2) -> OpCase:
    """The paper's form: channel-wise StructSA, D patterns, key/value stride 1 or 2 (video (1, s, s))."""
    if kind == "image":  # stage 3 of StructViT-S at 224x224: 14x14 tokens, 5 heads of 64
        return OpCase(f"image 14x14, 3x3, channel-wise D={d}, stride {stride}", image_batch, 5, 64, (14, 14), (3, 3),
                      d, layout="channel", kv_stride=stride)
    return OpCase(f"video 8x14x14, 3x3x3, channel-wise D={d}, stride (1, {stride}, {stride})", video_batch, 5, 64,
                  (8, 14, 14), (3, 3, 3), d, layout="channel", kv_stride=(1, stride, stride))


PAPER_CASES = [f"{kind}_c{d}_s{s}" for kind in ("image", "video") for d in (4, 8) for s in (1, 2)]
# the same at GPU batch sizes (128 images, 16 clips): what one training step of the stage sees
GPU_CASES = [f"gpu_{key}" for key in PAPER_CASES]
OP_CASES = {
    # the paper's StructSA: channel-wise patterns, D = 4 or 8, stride 1 or 2
    **{f"{kind}_c{d}_s{s}": _paper_case(kind, d, s) for kind in ("image", "video") for d in (4, 8) for s in (1, 2)},
    **{f"gpu_{kind}_c{d}_s{s}": _paper_case(kind, d, s, 128, 16)
       for kind in ("image", "video") for d in (4, 8) for s in (1, 2)},
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
BACKENDS = ["naive", "correlation", "keyconv", "keyconv-torch", "fused", "auto", "auto-mem", "sa-keys"]
DEFAULT_BACKENDS = {"cpu": ["naive", "correlation", "keyconv", "fused", "auto", "auto-mem"],
                    "cuda": ["keyconv", "keyconv-torch", "auto", "sa-keys"]}


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
    "sa-keys" the same over D * N' keys and values; "auto-mem" is "auto" told to keep its
    working memory under ``memory_limit`` bytes)."""
    if backend == "sa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    if backend == "sa-keys":
        return functools.partial(_sdpa_over_pattern_keys, case)
    if backend == "keyconv-torch":
        return functools.partial(_keyconv_with_torch_convolutions, case)
    limit = memory_limit if backend == "auto-mem" else None
    backend = "auto" if backend == "auto-mem" else backend
    return lambda q, k, v, u_k, u_v: struct_attention(q, k, v, u_k, u_v, case.grid, kv_stride=case.kv_stride,
                                                      normalize=case.normalize, backend=backend, memory_limit=limit)


def _sdpa_over_pattern_keys(case: OpCase, q, k, v):
    """SDPA with D * N' keys and values (k and v repeated D times on the strided grid): the
    attention StructSA runs, without its convolutions."""
    keep = [slice(None, None, s) for s in case.stride3[3 - len(case.grid):]]
    def many(t):
        return t.unflatten(2, case.grid)[(..., *keep, slice(None))].flatten(2, -2).repeat(1, 1, case.patterns, 1)
    return F.scaled_dot_product_attention(q, many(k), many(v))


def _keyconv_with_torch_convolutions(case: OpCase, q, k, v, u_k, u_v):
    """keyconv with PyTorch's convolutions instead of its own kernels (the CPU kernel and the
    Triton ones switched off for the call; the backward runs on what the forward recorded)."""
    saved = config.settings()
    config.set_native_conv(False)
    config.set_triton(False)
    try:
        return struct_attention(q, k, v, u_k, u_v, case.grid, kv_stride=case.kv_stride, normalize=case.normalize,
                                backend="keyconv")
    finally:
        config.set_native_conv(saved.native_conv)
        config.set_triton(saved.triton)


def _inputs_for(backend: str, q, k, v, u_k, u_v) -> tuple:
    return (q, k, v) if backend in ("sa", "sa-keys") else (q, k, v, u_k, u_v)


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


def peak_main(case_key: str, normalize: str, backend: str, device: str, dtype: str, memory_limit: str = "0") -> int:
    """The fresh process of :func:`peak_memory_in_subprocess`: prints the peak."""
    case = OpCase(**{**OP_CASES[case_key].__dict__, "normalize": normalize})
    dev = torch.device(device)
    (q, k, v), (u_k, u_v) = make_op_inputs(case, dev, DTYPES[dtype])
    with PeakMemory(dev) as mem:
        op_fn(case, backend, int(memory_limit) or None)(*_inputs_for(backend, q, k, v, u_k, u_v)).float().sum().backward()
    print(mem.peak)
    return 0


def profile_breakdown(fn, top: int) -> list[tuple[str, float]]:
    """Where one call of ``fn`` spends its time: the ``top`` operators by self CPU time
    (torch profiler), in seconds, and the rest summed as "other"."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    events = sorted(((e.key, e.self_cpu_time_total / 1e6) for e in prof.key_averages()), key=lambda kv: -kv[1])
    rest = sum(t for _, t in events[top:])
    return events[:top] + ([("other", rest)] if rest > 0 else [])


def _skip_reason(case: OpCase, backend: str, q, u_k, u_v, naive_limit: int) -> str | None:
    """Why ``backend`` cannot or should not run the case (None: it runs)."""
    if backend in ("sa", "sa-keys", "auto", "auto-mem", "keyconv-torch"):
        return None
    try:
        resolve_backend(q, u_k, case.grid, u_v=u_v, kv_stride=case.kv_stride, backend=backend)
    except ValueError as err:  # correlation / fused: dot-product layouts at stride 1 only, on the CPU
        reason = str(err).split(": ", 1)[-1]
        if "channel-wise" in reason:
            reason = "channel-wise patterns"
        elif "kv_stride" in reason:
            reason = "kv_stride > 1"
        return f"cannot serve {reason}"
    if backend == "naive":
        m = math.prod(case.window)
        need = case.batch * case.heads * (case.keys * m * case.head_dim * 2 + 2 * case.tokens * case.patterns
                                          * case.keys) * q.element_size() * 2
        if need > naive_limit:
            return f"needs ~{need / 2**30:.0f} GiB"
    return None


def bench_op_case(case_key: str, case: OpCase, backends: list[str], *, device: str, dtype: str, repeats: int,
                  naive_limit: int = 2 << 30, memory_limit: int = 8 << 20, measure_memory: bool = True,
                  stat: str = "median", profile_top: int = 0) -> list[dict]:
    """Rows of {backend, seconds, peak bytes, ratios} for one shape, SA first (peak None
    without ``measure_memory``; on the CPU each measurement is a fresh process, seconds each;
    with ``profile_top`` each CPU row also gets its ``profile_breakdown``). On CUDA each row
    also has ``gpu`` (:func:`.common.gpu_kernel_time`: seconds of GPU time per call, and of
    it in the convolution kernels) and ``gpu_ratio`` (to SA's)."""
    dev = torch.device(device)
    (q, k, v), (u_k, u_v) = make_op_inputs(case, dev, DTYPES[dtype])
    auto, auto_mem = (resolve_backend(q, u_k, case.grid, u_v=u_v, kv_stride=case.kv_stride, memory_limit=lim)
                      for lim in (None, memory_limit))
    labels, fns, skipped = {}, {}, {}
    for backend in ["sa"] + backends:
        labels[backend] = {"sa": "SA (sdpa)", "auto": f"auto ({auto})", "keyconv-torch": "keyconv (PyTorch convolutions)",
                           "sa-keys": "SA over D * N' keys (the floor)",
                           "auto-mem": f"auto, memory_limit {memory_limit / 2**20:g} MiB ({auto_mem})"}.get(backend, backend)
        reason = _skip_reason(case, backend, q, u_k, u_v, naive_limit)
        if reason:
            skipped[backend] = reason
            continue
        inputs = _inputs_for(backend, q, k, v, u_k, u_v)
        fns[backend] = (lambda fn=op_fn(case, backend, memory_limit), inputs=inputs:
                        fn(*inputs).float().sum().backward())
    seconds = interleaved_medians(fns, repeats, dev, stat=stat)
    rows = []
    for backend, label in labels.items():
        if backend in skipped:
            rows.append({"backend": label, "skipped": skipped[backend]})
            continue
        peak = None
        if measure_memory and dev.type == "cuda":  # the allocator's peak is exact in-process
            with PeakMemory(dev) as mem:
                fns[backend]()
            peak = mem.peak
        elif measure_memory:
            peak = peak_memory_in_subprocess(case_key, case.normalize, backend, device, dtype, memory_limit)
        rows.append({"backend": label, "seconds": seconds[backend], "peak": peak, "auto": backend.startswith("auto"),
                     "floor": backend == "sa-keys"})
        if dev.type == "cuda":
            rows[-1]["gpu"] = gpu_kernel_time(fns[backend], dev)
        elif profile_top:
            rows[-1]["profile"] = profile_breakdown(fns[backend], profile_top)
    sa = rows[0]
    # the fastest explicit backend of the run, for the auto rows' "x fastest"
    fastest = min((r["seconds"] for r in rows[1:] if "seconds" in r and not r["auto"] and not r["floor"]),
                  default=None)
    for row in rows:
        if "seconds" in row:
            row["time_ratio"] = row["seconds"] / sa["seconds"]
            row["mem_ratio"] = row["peak"] / sa["peak"] if row["peak"] and sa["peak"] else None
            if row["auto"] and fastest:
                row["fastest_ratio"] = row["seconds"] / fastest
            if "gpu" in row:
                row["gpu_ratio"] = row["gpu"]["total"] / sa["gpu"]["total"]
    return rows


def _fmt_mem(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:.0f} MiB"


def _format_gpu_rows(rows: list[dict]) -> list[str]:
    lines = ["| backend | GPU time | x SA | x SA over D * N' keys | conv kernels' share | wall-clock | x SA "
             "| peak memory | x SA |", "|---|---|---|---|---|---|---|---|---|"]
    floor = next((r for r in rows if r.get("floor") and "gpu" in r), None)
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['backend']} | skipped ({r['skipped']}) | | | | | | | |")
            continue
        gpu = r["gpu"]
        x_floor = f"{gpu['total'] / floor['gpu']['total']:.2f}x" if floor else "n/a"
        share = f"{gpu['conv'] / gpu['total']:.0%}" if gpu["total"] else "n/a"
        mr = "n/a" if r["mem_ratio"] is None else f"{r['mem_ratio']:.2f}x"
        lines.append(f"| {r['backend']} | {gpu['total'] * 1e3:.2f} ms | {r['gpu_ratio']:.2f}x | {x_floor} | {share} | "
                     f"{r['seconds'] * 1e3:.2f} ms | {r['time_ratio']:.2f}x | {_fmt_mem(r['peak'])} | {mr} |")
    return lines


def format_op_table(case: OpCase, rows: list[dict]) -> str:
    keys = f", N'={case.keys} keys" if case.keys != case.tokens else ""
    lines = [f"### {case.name}: B={case.batch}, heads={case.heads}, C={case.head_dim}, N={case.tokens}{keys}, "
             f"{case.normalize}", ""]
    if any("gpu" in r for r in rows):
        lines += _format_gpu_rows(rows)
    else:
        lines += ["| backend | fwd+bwd | x SA | peak memory | x SA |", "|---|---|---|---|---|"]
        for r in rows:
            if "skipped" in r:
                lines.append(f"| {r['backend']} | skipped ({r['skipped']}) | | | |")
                continue
            mr = "n/a" if r["mem_ratio"] is None else f"{r['mem_ratio']:.1f}x"
            lines.append(f"| {r['backend']} | {r['seconds'] * 1e3:.1f} ms | {r['time_ratio']:.2f}x | "
                         f"{_fmt_mem(r['peak'])} | {mr} |")
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


def run_op(*, cases: list[str] | None = None, backends: list[str] | None = None, device: str = "cpu",
           dtype: str = "float32", repeats: int = 5, stat: str = "median", normalize: str = "joint",
           memory_limit_mib: float = 8.0, measure_memory: bool = True, profile_top: int = 0, threads: int = 0,
           write: str | None = None, argv: list[str] | None = None) -> list[str]:
    """Print (and with ``write``, write to that Markdown path) one table per case; returns the
    tables. ``cases`` default to the paper's (:data:`GPU_CASES` on CUDA), ``backends`` to
    :data:`DEFAULT_BACKENDS` of the device type."""
    dev = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    cases = list(cases or (GPU_CASES if dev.type == "cuda" else PAPER_CASES))
    backends = list(backends or DEFAULT_BACKENDS.get(dev.type, DEFAULT_BACKENDS["cpu"]))
    for name in cases:
        if name not in OP_CASES:
            raise ValueError(f"cases: unknown case {name!r}; choose from {sorted(OP_CASES)}")
    for name in backends:
        if name not in BACKENDS:
            raise ValueError(f"backends: unknown backend {name!r}; choose from {BACKENDS}")
    header = [f"# StructSA op benchmark: forward+backward, {dtype}, device={dev}"
              f"{'' if dev.type == 'cuda' else f', {torch.get_num_threads()} threads'}, torch {torch.__version__}",
              f"# machine: {machine_line(dev)}",
              "# ratios are to SA (scaled_dot_product_attention) measured in the same run"]
    print("\n".join(header) + "\n", flush=True)
    tables = []
    for name in cases:
        case = OP_CASES[name]
        if normalize != "joint":
            case = OpCase(**{**case.__dict__, "normalize": normalize})
        rows = bench_op_case(name, case, backends, device=device, dtype=dtype, repeats=repeats,
                             memory_limit=int(memory_limit_mib * 2**20), measure_memory=measure_memory, stat=stat,
                             profile_top=profile_top)
        tables.append(format_op_table(case, rows))
        print(tables[-1], "\n", flush=True)
        if write:  # after every case: a run stopped at a time limit keeps what it measured
            write_performance(write, tables, dev, argv=argv, stat=stat)
    if write:
        print(f"wrote {write}")
    return tables


def write_performance(path, tables: list[str], device: torch.device, argv: list[str] | None = None,
                      stat: str = "median") -> None:
    """Write the op tables to ``path`` (Markdown) with the command, machine, ISA and date."""
    cmd = "python -m structvit.bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    info = cpu_info()
    isa = ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in info["isa"].items())
    gpu = device.type == "cuda"
    lines = ["# Performance: the StructSA op against plain attention" + (" on the GPU" if gpu else ""), "",
             "Forward + backward of `struct_attention` and of `scaled_dot_product_attention` (SA) on the same",
             f"inputs, timed interleaved in one run ({'minimum' if stat == 'min' else 'median'} over rounds); "
             "ratios are to SA. Peak memory is",
             ("the CUDA allocator's peak of one call. GPU time is the kernels' time per call under the torch "
              "profiler (mean of 3 calls); the conv kernels' share is the part in the pattern-convolution kernels; "
              "\"SA over D * N' keys\" is SDPA over as many keys as StructSA's attention sees."
              if gpu else "measured in a fresh process per row (see `structvit.bench`)."),
             "\"x the fastest explicit backend\" is an auto row's time over the fastest of the backend rows of the "
             "same run.", "",
             f"- load average when written (1, 5, 15 min): {', '.join(f'{x:.2f}' for x in os.getloadavg())}",
             f"- command: `{cmd}`",
             f"- date: {datetime.date.today().isoformat()}",
             f"- machine: {info['model']}, {info['cpus']} logical CPUs, {torch.get_num_threads()} torch threads"
             + (f", {gpu_line(device)}" if gpu else ""),
             f"- ISA: {isa}",
             f"- {kernel_build_line()}",
             f"- torch {torch.__version__}, device {device}", ""]
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("\n".join(lines) + "\n" + "\n\n".join(tables) + "\n")
