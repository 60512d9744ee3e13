"""Argument validators shared by the op, the modules and the models.

Each returns the value in its canonical form or raises a ``ValueError`` that names the
argument, what was expected and what was given. ``bool`` is a subclass of ``int`` in
Python; none of these accept ``True``/``False`` as a size.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Sequence


def is_int(value) -> bool:
    """Whether ``value`` is an int (and not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value, minimum: int | None = None) -> int:
    """``value`` as an int, at least ``minimum`` (when given)."""
    if not is_int(value) or (minimum is not None and value < minimum):
        what = "an int" if minimum is None else ("a positive int" if minimum == 1 else
                                                 "a non-negative int" if minimum == 0 else f"an int >= {minimum}")
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


def check_positive_int(name: str, value) -> int:
    """``value`` as an int >= 1."""
    return check_int(name, value, minimum=1)


def check_optional_positive_int(name: str, value, unit: str = "") -> int | None:
    """None, or an int >= 1 (``unit`` names what it counts in the message)."""
    if value is not None and (not is_int(value) or value < 1):
        raise ValueError(f"{name} must be a positive int{f' ({unit})' if unit else ''} or None, got {value!r}")
    return value


def check_choice(name: str, value, choices: Sequence[str]):
    """``value``, which must be one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def are_sizes(values, minimum: int = 1, odd: bool = False) -> bool:
    """Whether ``values`` is a sequence (not a string) of ints >= ``minimum`` (odd ones if ``odd``)."""
    return (isinstance(values, Sequence) and not isinstance(values, str)
            and all(is_int(s) and s >= minimum and (not odd or s % 2 == 1) for s in values))


def check_window(name: str, window, ranks: Sequence[int] = (2, 3), int_rank: int | None = 2) -> tuple[int, ...]:
    """A window of odd positive sizes with one of ``ranks`` sizes; an int ``k`` is
    ``(k,) * int_rank`` (not accepted when ``int_rank`` is None)."""
    if is_int(window) and int_rank is not None:
        window = (window,) * int_rank
    if not are_sizes(window, odd=True) or len(window) not in ranks:
        examples = " or ".join(str((3,) * r) for r in ranks)
        count = " or ".join(map(str, ranks))
        raise ValueError(f"{name} must be {count} odd positive ints, e.g. {examples}, got {window!r}")
    return tuple(window)


def check_stride(name: str, stride, rank: int, int_form: Sequence[int] | None = None) -> tuple[int, ...]:
    """A stride of ``rank`` positive ints. An int ``s`` is ``(s,) * rank``, or, with
    ``int_form``, each entry of ``int_form`` that is 0 becomes ``s`` and the others stay
    (e.g. ``(1, 0, 0)``: a video model's int stride is spatial only)."""
    if is_int(stride) and stride > 0:
        stride = (stride,) * rank if int_form is None else tuple(stride if f == 0 else f for f in int_form)
    if not are_sizes(stride) or len(stride) != rank:
        raise ValueError(f"{name} must be a positive int or {rank} positive ints (one per grid axis), got {stride!r}")
    return tuple(stride)


def check_grid(name: str, grid, n: int | None = None) -> tuple[int, int, int]:
    """A (H, W) or (T, H, W) grid of positive ints whose product is ``n`` (when given),
    returned as (T, H, W)."""
    if not isinstance(grid, Sequence) or isinstance(grid, str) or len(grid) not in (2, 3):
        raise ValueError(f"{name} must be (H, W) or (T, H, W), got {grid!r}")
    if not are_sizes(grid):
        raise ValueError(f"{name} sizes must be positive ints, got {tuple(grid)!r}")
    if n is not None and math.prod(grid) != n:
        raise ValueError(f"{name}={tuple(grid)} has {math.prod(grid)} positions but the inputs have N={n} tokens")
    return (1,) * (3 - len(grid)) + tuple(grid)


def check_positive_number(name: str, value, allow_none: bool = True):
    """A finite real number > 0 (or None when ``allow_none``)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, Real) or isinstance(value, bool) or not math.isfinite(value) or not value > 0:
        raise ValueError(f"{name} must be a finite positive number{' or None' if allow_none else ''}, got {value!r}")
    return value


def check_tensor(name: str, t, *, dtypes: Sequence | None = None, like=None, device: str | None = None,
                 shape: Sequence[int] | None = None, dim: int | None = None, contiguous: bool = False):
    """A tensor with one of ``dtypes`` (or ``like``'s dtype and device), on ``device``, with
    ``dim`` dimensions or exactly ``shape``, and contiguous if asked; ``t`` itself."""
    import torch

    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if like is not None:
        dtypes, device = (like.dtype,), like.device.type
    if dtypes is not None and t.dtype not in dtypes:
        names = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must be {names}, got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device.type != device:
        raise ValueError(f"{name} must be on the {device} device, got {t.device}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()} for shape {tuple(t.shape)}")
    return t


def check_int_list(name: str, values, length: int, minimum: int = 1, odd: bool = False) -> tuple[int, ...]:
    """A sequence of ``length`` ints >= ``minimum`` (odd ones if ``odd``), as a tuple."""
    if not are_sizes(values, minimum, odd) or len(values) != length:
        what = f"{length} {'odd ' if odd else ''}ints >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {values!r}")
    return tuple(values)
