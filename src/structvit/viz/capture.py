"""Capture what an attention layer sees, and recompute its attention weights.

Every attention layer of StructViT (``SelfAttention``, ``StructSA``, ConvSA = StructSA
with D = 1) is called as ``attn(x, grid)`` with ``x`` (B, N, dim) the normalised tokens
and ``grid`` (H, W) or (T, H, W). A forward pre-hook on the layer records both; the
weights are then recomputed exactly as the layer computes them:

- StructSA / ConvSA: the op (``struct_attention_unchecked``) with the layer's own q, k,
  v, canonical patterns (:meth:`StructSA.canonical_patterns`), key/value stride
  (:meth:`StructSA.stride_for`), scale and normalisation, asked for the weights
  (B, heads, N, D, N'): N' = the keys on the strided grid (N at stride 1). A layer whose
  backend cannot return weights ("fused") is recomputed on "auto", which picks a backend
  that can (channel-wise patterns: "keyconv", which then forms the weights explicitly);
- SA: ``softmax(q k^T * scale)``, returned with a pattern axis of size 1.

The model code is not touched: hooks are removed when the capture ends.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn

from ..nn.attention import SelfAttention, StructSA
from ..ops import struct_attention_unchecked
from ..ops.checks import is_int

__all__ = ["AttentionCapture", "attention_layers", "layer_kind", "capture", "attention_weights", "parse_query",
           "query_index", "default_block"]


def layer_kind(module: nn.Module) -> str:
    """"structsa", "convsa" (StructSA with one pattern) or "sa"."""
    if isinstance(module, StructSA):
        return "convsa" if module.num_patterns == 1 else "structsa"
    if isinstance(module, SelfAttention):
        return "sa"
    raise TypeError(f"not an attention layer: {type(module).__name__}")


def attention_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention layers of a model, in forward order: ``[(qualified name, layer), ...]``.

    "Block index" everywhere in :mod:`structvit.viz` is a position in this list (stages 3
    and 4 of a StructViT, whatever the kind of attention). A bare attention layer is its
    own list of one.
    """
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SelfAttention)]


@dataclass
class AttentionCapture:
    """The input of one attention layer in one forward pass (batch element ``0..B-1``)."""

    index: int
    name: str
    kind: str
    module: nn.Module
    x: torch.Tensor  # (B, N, dim): the layer's input tokens
    grid: tuple[int, ...]  # (H, W) or (T, H, W), as given to the layer
    extra: dict = field(default_factory=dict)

    @property
    def grid3(self) -> tuple[int, int, int]:
        return (1,) * (3 - len(self.grid)) + tuple(self.grid)

    @property
    def num_heads(self) -> int:
        return self.module.num_heads

    @property
    def kv_stride3(self) -> tuple[int, int, int]:
        """The key/value stride (st, sh, sw) on this grid; (1, 1, 1) for SA."""
        if isinstance(self.module, StructSA):
            return tuple(self.module.stride_for(len(self.grid)))
        return (1, 1, 1)

    @property
    def key_grid3(self) -> tuple[int, int, int]:
        """The (T', H', W') grid of the keys: ceil(n / s) per axis (the query grid at stride 1)."""
        return tuple(-(-n // s) for n, s in zip(self.grid3, self.kv_stride3))

    def weights(self, normalize: str | None = None) -> torch.Tensor:
        """Attention weights (B, heads, N, D, N') of this layer on the captured input."""
        return attention_weights(self.module, self.x, self.grid, normalize=normalize)

    def patterns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """u_k, u_v as (heads, cu, D, kt, kh, kw) for this grid: the op's canonical layout with
        the head axis expanded (shared patterns); cu = the head width for channel-wise
        patterns, 1 for the dot-product layouts. The value window may differ from the key window."""
        if not isinstance(self.module, StructSA):
            raise TypeError(f"block {self.index} ({self.name}) is plain self-attention (SA): it has no patterns")
        heads = self.module.num_heads
        u_k, u_v = self.module.canonical_patterns(len(self.grid))
        return (u_k.detach().expand((heads,) + tuple(u_k.shape[1:])),
                u_v.detach().expand((heads,) + tuple(u_v.shape[1:])))


def capture(model: nn.Module, x: torch.Tensor, blocks: Sequence[int] | None = None) -> list[AttentionCapture]:
    """Run ``model(x)`` (eval mode, no grad) and record the input of attention layers.

    Args:
        model: any module containing StructViT attention layers (or one such layer,
            then ``x`` is its (B, N, dim) input and must come as ``(x, grid)``).
        x: the model's input, e.g. (B, 3, H, W) or (B, 3, T, H, W); a tuple is unpacked
            into the call.
        blocks: indices (see :func:`attention_layers`) to keep; default all.

    Returns:
        one :class:`AttentionCapture` per kept layer, in forward order. The model's
        train/eval mode is restored afterwards.
    """
    layers = attention_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no attention layers (SelfAttention/StructSA/ConvSA)")
    keep = range(len(layers)) if blocks is None else blocks
    for b in keep:
        if not isinstance(b, int) or isinstance(b, bool) or not 0 <= b < len(layers):
            raise ValueError(f"block must be an attention block index in [0, {len(layers)}), got {b!r} "
                             f"(the model has {len(layers)} attention blocks)")
    records: dict[int, AttentionCapture] = {}
    handles = []

    def make_hook(i: int, name: str, module: nn.Module):
        def hook(mod, args, kwargs):
            xs = args[0] if args else kwargs["x"]
            grid = args[1] if len(args) > 1 else kwargs.get("grid")
            if grid is None:
                n = xs.shape[1]
                side = int(round(math.sqrt(n)))
                grid = (side, side)
            if i not in records:  # first call only (e.g. a model called twice inside forward)
                records[i] = AttentionCapture(i, name, layer_kind(module), module, xs.detach(),
                                              tuple(int(s) for s in grid))
        return hook

    for i in keep:
        name, module = layers[i]
        handles.append(module.register_forward_pre_hook(make_hook(i, name, module), with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*x) if isinstance(x, tuple) else model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [records[i] for i in keep if i in records]


@torch.no_grad()
def attention_weights(module: nn.Module, x: torch.Tensor, grid: Sequence[int],
                      normalize: str | None = None) -> torch.Tensor:
    """The attention weights (B, heads, N, D, N') of ``module`` on input tokens ``x``.

    N' is the number of keys (on the grid strided by the layer's ``kv_stride``); SA
    layers give D = 1 and N' = N. ``normalize`` overrides a StructSA layer's softmax
    reading ("joint" / "per_pattern") on the same scores; default: the layer's own.
    """
    if normalize not in (None, "joint", "per_pattern"):
        raise ValueError(f"normalize must be 'joint' or 'per_pattern', got {normalize!r}")
    q, k, v = module._qkv(x)
    if isinstance(module, StructSA):
        rank = len(grid)
        grid3 = (1,) * (3 - rank) + tuple(int(s) for s in grid)
        u_k, u_v = module.canonical_patterns(rank, q.dtype)
        backend = module.backend if module.backend in ("naive", "keyconv", "correlation") else "auto"
        _, w, _ = struct_attention_unchecked(q, k, v, u_k, u_v, grid3, module.stride_for(rank),
                                             normalize or module.normalize, backend, module.scale, 0.0, True,
                                             module.memory_limit)
        return w
    if isinstance(module, SelfAttention):
        a = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * module.scale, dim=-1)
        return a.unsqueeze(3)
    raise TypeError(f"not an attention layer: {type(module).__name__}")


def parse_query(text) -> tuple[int, ...]:
    """"h,w" or "t,h,w" (also a sequence of ints) -> a tuple of ints."""
    if isinstance(text, str):
        try:
            vals = tuple(int(t) for t in text.replace(" ", "").split(","))
        except ValueError:
            raise ValueError(f"query must be 'h,w' or 't,h,w' (ints), got {text!r}") from None
    else:
        vals = tuple(text)
        if not all(is_int(v) for v in vals):
            raise ValueError(f"query must be 2 or 3 ints (h, w) or (t, h, w), got {text!r}")
    if len(vals) not in (2, 3):
        raise ValueError(f"query must be 'h,w' or 't,h,w', got {text!r}")
    return vals


def query_index(query, grid: Sequence[int]) -> tuple[int, tuple[int, int, int]]:
    """Flat token index and (t, h, w) of a query position on ``grid``; None = the centre.

    An (h, w) query on a (T, H, W) grid means frame T // 2. Raises ``ValueError`` naming
    the query and the grid when it lies outside.
    """
    grid3 = (1,) * (3 - len(grid)) + tuple(grid)
    if query is None:
        pos = (grid3[0] // 2, grid3[1] // 2, grid3[2] // 2)
    else:
        q = parse_query(query)
        if len(q) == 3 and len(grid) == 2:
            raise ValueError(f"query {q} is (t, h, w) but block grid {tuple(grid)} is an image grid (h, w)")
        pos = (grid3[0] // 2,) + q if len(q) == 2 else q
        if not all(0 <= p < s for p, s in zip(pos, grid3)):
            shown = q if len(q) == len(grid) else pos
            raise ValueError(f"query {tuple(shown)} is outside the block's token grid {tuple(grid)} "
                             f"(valid: 0 <= index < size on each axis)")
    t, h, w = pos
    return (t * grid3[1] + h) * grid3[2] + w, pos


def default_block(captures: Sequence[AttentionCapture], kinds=("structsa", "convsa")) -> AttentionCapture:
    """The structural block with the largest grid (the last of equals); any block if none is structural."""
    cands = [c for c in captures if c.kind in kinds] or list(captures)
    best = max(math.prod(c.grid) for c in cands)
    return [c for c in cands if math.prod(c.grid) == best][-1]
