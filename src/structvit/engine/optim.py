"""Optimiser and learning-rate schedule of the recipe.

* :func:`param_groups`: two AdamW groups, with and without weight decay. No decay on
  norms and biases (every parameter with fewer than 2 dimensions), on the position
  encodings and on the StructSA patterns ``u_k``/``u_v`` (the model's
  ``no_weight_decay()`` names, plus anything matching ``skip_patterns``).
* :class:`WarmupCosine`: linear warmup from ``warmup_start`` to 1 over ``warmup_steps``,
  then a half cosine down to ``min_ratio``; a multiplier for ``LambdaLR`` stepped once
  per optimiser step (not per epoch).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn

__all__ = ["NO_DECAY_PATTERNS", "param_groups", "WarmupCosine", "build_optimizer"]

#: substrings of parameter names that never get weight decay (in addition to 0-/1-D tensors)
NO_DECAY_PATTERNS = ("pos_embed", ".u_k", ".u_v", "cls_token")


def param_groups(model: nn.Module, weight_decay: float, skip_patterns: Iterable[str] = NO_DECAY_PATTERNS,
                 ) -> list[dict]:
    """``[{"params": decayed, "weight_decay": wd}, {"params": rest, "weight_decay": 0}]``.

    Each group also carries ``"names"`` (parameter names), for inspection and tests;
    torch's optimisers keep extra keys of a group untouched.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    patterns = tuple(skip_patterns)
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name in skip or any(s in name for s in patterns):
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    groups = [dict(params=decay, weight_decay=float(weight_decay), names=decay_names),
              dict(params=no_decay, weight_decay=0.0, names=no_decay_names)]
    return [g for g in groups if g["params"]]


class WarmupCosine:
    """LR multiplier at optimiser step ``s`` (a picklable callable for ``LambdaLR``).

    ``s < warmup_steps``: ``warmup_start + (1 - warmup_start) * (s + 1) / warmup_steps``
    (so the first step already moves); then ``min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2``
    with ``p`` going from 0 to 1 over the remaining ``total_steps - warmup_steps`` steps.
    """

    def __init__(self, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0, warmup_start: float = 0.0):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
        if not 0.0 <= min_ratio <= 1.0 or not 0.0 <= warmup_start <= 1.0:
            raise ValueError(f"min_ratio and warmup_start must be in [0, 1], got {min_ratio}, {warmup_start}")
        self.total_steps, self.warmup_steps = int(total_steps), int(warmup_steps)
        self.min_ratio, self.warmup_start = float(min_ratio), float(warmup_start)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_start + (1.0 - self.warmup_start) * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        p = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8,
                    ) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps)
