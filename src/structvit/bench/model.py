"""``bench model``: training steps and inference passes of registered models against their all-SA versions.

Each StructSA model is timed against the same model with SA in every attention block (its
UniFormer / DeiT version), the two interleaved step by step (measured one after the other, the
ratio of the CPU image training step read anywhere from 0.8x to 1.15x between runs). On CUDA
the step's GPU kernel time (torch profiler, mean of 3 steps after warm-up) is the measure, with
the wall-clock beside it (launch-bound on a fast GPU), and the allocator's peak memory.
"""
from __future__ import annotations

import contextlib
import datetime
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .common import PeakMemory, SDPA_PREFIX, gpu_kernel_time, interleaved_medians, machine_line, sync

# the paper's StructViT-S at both strides, image and video, against UniFormer-S (all SA)
TRAIN_MODELS = ("structvit_s_4_1", "structvit_s_4_2", "structvit_s_4_1_video", "structvit_s_4_2_video")
# on the GPU: those, D = 8, and the DeiT-style ablation backbone
GPU_TRAIN_MODELS = ("structvit_deit_small", "structvit_s_4_2", "structvit_s_4_1", "structvit_s_8_1",
                    "structvit_s_4_2_video", "structvit_s_4_1_video")
PRECISIONS = ("32", "bf16-mixed")


def _model(name: str, **kwargs):
    import timm

    from .. import models  # noqa: F401  (registers the StructViT models)

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


def _autocast(device: torch.device, precision: str):
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step_fn(model, shape, device: torch.device, precision: str = "32"):
    """One forward + backward + AdamW step of ``model`` on random data of ``shape`` (bf16
    autocast with ``precision="bf16-mixed"``; the fused AdamW on CUDA)."""
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x = torch.randn(shape, device=device)
    y = torch.randint(0, model.num_classes, (shape[0],), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        with _autocast(device, precision):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def inference_fn(model, shape, device: torch.device, precision: str = "32"):
    """One no-grad eval forward pass of ``model`` on random data of ``shape``."""
    model.to(device).eval()
    x = torch.randn(shape, device=device)

    def fwd():
        with torch.no_grad(), _autocast(device, precision):
            model(x)

    return fwd


def backends_used(model) -> str:
    """The StructSA backends the model's last forward ran, e.g. "fused x4, keyconv x1"."""
    from collections import Counter

    from ..nn import StructSA

    used = Counter(m.last_backend for m in model.modules() if isinstance(m, StructSA) and m.last_backend)
    return ", ".join(f"{name} x{count}" for name, count in sorted(used.items())) or "-"


def sdpa_share(fn, device: torch.device) -> float:
    """The fraction of one call of ``fn`` (a warmed-up training step or inference pass) spent
    in ``scaled_dot_product_attention``'s forward and backward kernels (torch profiler, CPU
    time; on CUDA use :func:`.common.gpu_kernel_time`)."""
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        sync(device)
        total = time.perf_counter() - t0
    # aten::_scaled_dot_product_{flash_attention_for_cpu,efficient_attention,...}[_backward]: the
    # kernels SDPA dispatches to, each counted once with what it calls (the public wrapper
    # aten::scaled_dot_product_attention has no leading underscore and is not counted again)
    attention = sum(e.cpu_time_total for e in prof.key_averages() if e.key.startswith(SDPA_PREFIX)) / 1e6
    return min(1.0, attention / total)


def key_factor(model) -> float:
    """D * N' / N, how many more keys StructSA's SDPA sees than plain attention, averaged
    over the model's StructSA layers (the registered models give all of them the same D
    and stride; the stride-2 models: about D / 4)."""
    from ..nn import StructSA

    layers = [m for m in model.modules() if isinstance(m, StructSA)]
    if not layers:
        return 1.0
    return sum(m.num_patterns * math.prod(1 / s for s in m.kv_stride) for m in layers) / len(layers)


def floor_of(share: float, model) -> float:
    """The ratio ``model`` would reach if its StructSA cost exactly SDPA over D * N' keys, from
    the SDPA share of its all-SA version's call: 1 + share * (D * N' / N - 1)."""
    return 1 + share * (key_factor(model) - 1)


def attention_floor(sa_fn, model, device: torch.device) -> tuple[float, float]:
    """(SDPA share of ``sa_fn``, the all-SA version's call, and the floor it sets for ``model``)."""
    share = sdpa_share(sa_fn, device)
    return share, floor_of(share, model)


def _batch(model, device: torch.device, image_batch: int | None, video_batch: int | None) -> int:
    """The batch of a model: the given one, else CPU 4 images / 1 clip, CUDA 64 images (128 for
    the DeiT-style models) / 8 clips."""
    if getattr(model, "video", False):
        return video_batch or (8 if device.type == "cuda" else 1)
    if image_batch:
        return image_batch
    if device.type != "cuda":
        return 4
    return 64 if hasattr(model, "struct_blocks") else 128


def _gpu_row(name: str, shape, fns: dict, model, device: torch.device, repeats: int, with_memory: bool) -> str:
    """One CUDA table row: GPU time of the StructSA and all-SA calls, the floor, SDPA and conv
    kernels' time of each, wall-clock and peak memory."""
    wall = interleaved_medians(fns, repeats, device)
    gpu = {k: gpu_kernel_time(fn, device) for k, fn in fns.items()}
    peaks = {}
    for k, fn in fns.items():
        if with_memory:
            with PeakMemory(device) as mem:
                fn()
            peaks[k] = mem.peak
    sa, st = gpu["sa"], gpu["all"]
    ratio = st["total"] / sa["total"]
    floor = floor_of(sa["sdpa"] / sa["total"], model)
    mem = (f"{peaks['sa'] / 2**20:.0f} → {peaks['all'] / 2**20:.0f} MiB ({peaks['all'] / peaks['sa']:.2f}x)"
           if peaks else "n/a")
    return (f"| {name} | {'x'.join(map(str, shape))} | {sa['total'] * 1e3:.1f} ms | {st['total'] * 1e3:.1f} ms | "
            f"{ratio:.2f}x | {floor:.2f}x | {ratio / floor:.2f} | {sa['sdpa'] * 1e3:.1f} → {st['sdpa'] * 1e3:.1f} ms | "
            f"{sa['conv'] * 1e3:.1f} → {st['conv'] * 1e3:.1f} ms | {wall['sa'] * 1e3:.1f} → {wall['all'] * 1e3:.1f} ms "
            f"({wall['all'] / wall['sa']:.2f}x) | {mem} | {backends_used(model)} |")


GPU_HEADER = ("| model | input | all-SA GPU time | StructSA GPU time | x all-SA | floor | x floor | SDPA kernels "
              "(all-SA → StructSA) | pattern/depthwise conv kernels | wall-clock | peak memory | StructSA backends |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|")


def run_model(*, what=("train", "infer"), models: list[str] | None = None, image_batch: int | None = None,
              video_batch: int | None = None, backend: str = "auto", device: str = "cpu", repeats: int = 3,
              threads: int = 0, precision: str = "32", write: str | None = None,
              argv: list[str] | None = None) -> list[str]:
    """Print (and with ``write``, write to that Markdown path) the training table and/or the
    inference table; returns the printed lines. Batches default per device (:func:`_batch`)."""
    from ..models import MODEL_NAMES, check_model_name
    from ..models.summary import default_input_shape

    for name in models or ():
        check_model_name(name, "models")
    dev = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if threads:
        torch.set_num_threads(threads)
    gpu = dev.type == "cuda"
    out: list[str] = []

    def emit(line: str = "") -> None:
        out.append(line)
        print(line, flush=True)
        if write and line.startswith("| "):  # after every row: a run stopped at a time limit keeps its rows
            _write_page(write, out, argv)

    emit(f"# machine: {machine_line(dev)}")
    emit(f"# StructViT model benchmark: device={dev}"
         f"{'' if gpu else f', {torch.get_num_threads()} threads'}, torch {torch.__version__}, "
         f"backend={backend}, precision {precision}, median of {repeats} interleaved rounds\n")
    if "train" in what:
        emit("### Training step (fwd + bwd + AdamW), StructSA in every attention block vs SA in every block\n")
        emit("The floor: the all-SA step with its SDPA time (forward + backward, profiled) multiplied by the "
             "keys' factor D * N' / N, the least StructSA's attention can cost (SDPA over D * N' keys).\n")
        if gpu:
            emit("GPU time: every kernel of one step (torch profiler, mean of 3 steps after warm-up); wall-clock: "
                 "median of the interleaved rounds; peak memory: the allocator's peak over one step.\n")
            emit(GPU_HEADER)
        else:
            emit("| model | input | SA step | StructSA step | x SA | SDPA share of the SA step | floor | x floor "
                 "| StructSA backends (auto) |")
            emit("|---|---|---|---|---|---|---|---|---|")
        for name in models or (GPU_TRAIN_MODELS if gpu else TRAIN_MODELS):
            pair = _pair(name, backend)
            shape = default_input_shape(pair["all"], _batch(pair["all"], dev, image_batch, video_batch))
            steps = {k: train_step_fn(m, shape, dev, precision) for k, m in pair.items()}
            if gpu:
                emit(_gpu_row(name, shape, steps, pair["all"], dev, repeats, with_memory=True))
            else:
                times = interleaved_medians(steps, repeats, dev)
                share, floor = attention_floor(steps["sa"], pair["all"], dev)
                ratio = times["all"] / times["sa"]
                emit(f"| {name} | {'x'.join(map(str, shape))} | {times['sa']:.2f} s | {times['all']:.2f} s | "
                     f"{ratio:.2f}x | {share:.1%} | {floor:.2f}x | {ratio / floor:.2f} | {backends_used(pair['all'])} |")
            del pair, steps
        emit()
    if "infer" in what:
        emit("### Inference (eval, no grad), each model vs the same model with all-SA\n")
        if gpu:
            emit(GPU_HEADER)
        else:
            emit("| model | input | StructSA blocks | samples/s | all-SA samples/s | x SA time | SDPA share of the SA "
                 "pass | floor | x floor | StructSA backends (auto) |")
            emit("|---|---|---|---|---|---|---|---|---|---|")
        for name in models or MODEL_NAMES:
            model = _model(name, backend=backend)
            batch = _batch(model, dev, image_batch, video_batch)
            shape = default_input_shape(model, batch)
            fns = {"all": inference_fn(model, shape, dev, precision),
                   "sa": inference_fn(_model(name, **_sa_kwargs(model)), shape, dev, precision)}
            if gpu:
                emit(_gpu_row(name, shape, fns, model, dev, repeats, with_memory=False))
            else:
                times = interleaved_medians(fns, repeats, dev)
                t, t_sa = times["all"], times["sa"]
                share, floor = attention_floor(fns["sa"], model, dev)
                blocks = getattr(model, "struct_blocks", "all")  # the DeiT-style models: every block
                emit(f"| {name} | {batch}x{'x'.join(map(str, shape[1:]))} | {blocks} | {batch / t:.2f} | "
                     f"{batch / t_sa:.2f} | {t / t_sa:.2f}x | {share:.1%} | {floor:.2f}x | {t / t_sa / floor:.2f} | "
                     f"{backends_used(model)} |")
            del model, fns
    if write:
        _write_page(write, out, argv)
        print(f"wrote {write}")
    return out


def _write_page(path, lines: list[str], argv: list[str] | None) -> None:
    cmd = "python -m structvit.bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    head = ["# Performance: StructViT models against their all-SA versions", "",
            f"- command: `{cmd}`", f"- date: {datetime.date.today().isoformat()}",
            f"- load average when written (1, 5, 15 min): {', '.join(f'{x:.2f}' for x in os.getloadavg())}", ""]
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    # the printed "# machine" and "# StructViT model benchmark" lines are plain lines on the page
    p.write_text("\n".join(head + [line.removeprefix("# ") for line in lines]) + "\n")
