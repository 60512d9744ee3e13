"""Benchmarks: ``python -m structvit.bench op|model|autotune`` (or ``structvit bench ...``).

- ``op`` (:mod:`.op`): forward + backward of every StructSA backend against plain attention
  (``scaled_dot_product_attention``, "SA") on the same inputs in the same run, as ratios to SA
  (absolute times on a shared machine are noisy; ratios measured side by side are not), with
  peak memory; on CUDA also GPU kernel time, the pattern convolutions' share and SDPA over
  D * N' keys (the floor).
- ``model`` (:mod:`.model`): training steps and inference passes of registered models against
  their all-SA versions, with the SDPA share and the floor it sets; on CUDA in GPU kernel time.
- ``autotune``: the choices "auto" recorded on this machine.

:func:`run_op` and :func:`run_model` take keyword arguments, for code; the command line is :mod:`.cli`.
"""
from .cli import build_parser, main
from .common import DTYPES, PeakMemory, cpu_info, gpu_kernel_time, interleaved_medians, kernel_build_line, machine_line
from .model import (GPU_TRAIN_MODELS, TRAIN_MODELS, _model, _pair, attention_floor, backends_used, inference_fn,
                    key_factor, run_model, sdpa_share, train_step_fn)
from .op import (GPU_CASES, OP_CASES, PAPER_CASES, OpCase, bench_op_case, format_op_table, make_op_inputs, op_fn,
                 run_op, write_performance)

__all__ = ["main", "build_parser", "run_op", "run_model", "bench_op_case", "format_op_table", "write_performance",
           "OpCase", "OP_CASES", "PAPER_CASES", "GPU_CASES", "make_op_inputs", "op_fn", "DTYPES", "PeakMemory",
           "cpu_info", "machine_line", "kernel_build_line", "interleaved_medians", "gpu_kernel_time", "TRAIN_MODELS",
           "GPU_TRAIN_MODELS", "train_step_fn", "inference_fn", "backends_used", "sdpa_share", "attention_floor",
           "key_factor", "_model", "_pair"]
