"""Depthwise convolutions of the backbone (odd window, stride 1, "same" padding) that use the
Triton kernel on CUDA.

:class:`DepthwiseConv2d` / :class:`DepthwiseConv3d` are ``nn.Conv2d`` / ``nn.Conv3d`` with
``groups = channels``: the same parameters and state-dict keys (``weight``, ``bias``), so
checkpoints load either way. On CUDA tensors, where Triton is installed and not switched off
(``STRUCTVIT_TRITON=0``, ``config.set_triton(False)``), the forward runs
:mod:`structvit.ops.triton.depthwise` (channels-last maps stay channels-last); everywhere
else, in an ONNX export and under TorchScript, it is PyTorch's convolution. Under CUDA autocast the kernel
gets the autocast dtype, as PyTorch's convolution would.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import config
from ..ops.checks import is_int
from ..ops.triton import available as triton_available


def triton_serves(x: torch.Tensor) -> bool:
    """Whether the Triton depthwise kernel runs for ``x``: a CUDA tensor, Triton installed and
    switched on, not an ONNX export."""
    return (x.device.type == "cuda" and config.settings().triton and triton_available()
            and not torch.onnx.is_in_onnx_export())


def _triton_depthwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    from ..ops.triton.depthwise import depthwise_conv_forward  # imports Triton: only when used

    if torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    elif weight.dtype != x.dtype:
        raise ValueError(f"x ({x.dtype}) and the convolution's weight ({weight.dtype}) must have one dtype")
    return depthwise_conv_forward(x, weight, bias)


def _check_kernel(kernel_size: int) -> None:
    if not is_int(kernel_size) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd positive int, got {kernel_size!r}")


class DepthwiseConv2d(nn.Conv2d):
    """Depthwise k x k convolution over (B, C, H, W), padding k // 2 (``nn.Conv2d(channels,
    channels, k, padding=k // 2, groups=channels)``)."""

    def __init__(self, channels: int, kernel_size: int, bias: bool = True):
        _check_kernel(kernel_size)
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # TorchScript: PyTorch's convolution
            if triton_serves(x):
                return _triton_depthwise(x, self.weight, self.bias)
        return self._conv_forward(x, self.weight, self.bias)


class DepthwiseConv3d(nn.Conv3d):
    """Depthwise k x k x k convolution over (B, C, T, H, W), padding k // 2 (``nn.Conv3d(channels,
    channels, k, padding=k // 2, groups=channels)``)."""

    def __init__(self, channels: int, kernel_size: int, bias: bool = True):
        _check_kernel(kernel_size)
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # TorchScript: PyTorch's convolution
            if triton_serves(x):
                return _triton_depthwise(x, self.weight, self.bias)
        return self._conv_forward(x, self.weight, self.bias)


def depthwise_conv(channels: int, kernel_size: int, video: bool) -> nn.Conv2d | nn.Conv3d:
    """A :class:`DepthwiseConv3d` for a video model, else a :class:`DepthwiseConv2d`."""
    return (DepthwiseConv3d if video else DepthwiseConv2d)(channels, kernel_size)
