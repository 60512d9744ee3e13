"""Which form of a Triton kernel a call launches: compiled for a CUDA tensor, interpreted for a CPU one."""
from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl


def accumulator_type(dtype: torch.dtype):
    """fp32 accumulation for fp32 / bf16 / fp16 inputs, fp64 for fp64 (the tests' reference precision)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@functools.cache
def _interpreted(kernel):
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(kernel.fn)


def runner(kernel, device: torch.device):
    """``kernel`` (a ``triton.jit`` function) for tensors on ``device``: itself on CUDA, its
    interpreted form on the CPU (already interpreted when ``TRITON_INTERPRET=1`` was set
    before this package was imported)."""
    if device.type == "cuda":
        return kernel
    if device.type != "cpu":
        raise ValueError(f"the Triton kernels run on CUDA tensors (or CPU ones, interpreted), got {device}")
    if not isinstance(kernel, triton.runtime.JITFunction):
        return kernel  # TRITON_INTERPRET=1: triton.jit made it an InterpretedFunction already
    return _interpreted(kernel)


def device_guard(t: torch.Tensor):
    """The CUDA device context of ``t`` (Triton launches on the current device), or a no-op."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
