"""Triton kernels: keyconv's pattern convolutions and the backbone's depthwise convolutions on the GPU.

The kernels run on CUDA tensors. On CPU tensors they run under Triton's interpreter (what
``TRITON_INTERPRET=1`` does), which is slow and meant for the tests; nothing on the CPU
routes to them otherwise. Import this package's modules only where Triton is installed
(:func:`available`).
"""
from __future__ import annotations

import importlib.util


# looked up once: the per-call checks read a constant, which torch.compile traces without a break
_INSTALLED = importlib.util.find_spec("triton") is not None


def available() -> bool:
    """Whether Triton is installed (it ships with PyTorch's CUDA builds)."""
    return _INSTALLED
