"""Attention modules over a token grid: plain self-attention and StructSA.

Both take ``x`` of shape (B, N, dim) and the grid (H, W) or (T, H, W) the N tokens
lie on, and share the parameter names ``qkv`` and ``proj`` (those of timm and
UniFormer), so a state dict moves between them. StructSA adds ``u_k`` and ``u_v``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import BACKEND_NAMES, NORMALIZE, resolve_backend, struct_attention
from ..ops.functional import canonical_grid, check_memory_limit

INITS = ("random", "sa")


class SelfAttention(nn.Module):
    """Multi-head self-attention over all N tokens (SA), on ``scaled_dot_product_attention``.

    Args:
        dim: token width; must be divisible by ``num_heads``.
        num_heads: number of heads (head dim = dim // num_heads).
        qkv_bias: bias in the qkv projection.
        attn_drop: dropout on the attention weights (training only).
        proj_drop: dropout after the output projection.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(num_heads, int) or num_heads <= 0 or dim % num_heads:
            raise ValueError(f"num_heads must be a positive int dividing dim={dim}, got {num_heads!r}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _qkv(self, x: torch.Tensor):
        """(B, N, dim) -> three (B, heads, N, head_dim)."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (B, N, {self.dim}), got {tuple(x.shape)}")
        b, n, _ = x.shape
        return self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, head_dim) -> (B, N, dim)."""
        b, _, n, _ = y.shape
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(b, n, self.dim)))

    def forward(self, x: torch.Tensor, grid: Sequence[int] | None = None) -> torch.Tensor:
        """x: (B, N, dim); grid is accepted for a common signature and checked, not needed."""
        q, k, v = self._qkv(x)
        if grid is not None:
            canonical_grid(grid, x.shape[1])
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self._out(y)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"


def _window3(window, name: str = "window") -> tuple[int, ...]:
    if isinstance(window, int):
        window = (window, window)
    window = tuple(window)
    if len(window) not in (2, 3) or not all(isinstance(s, int) and s > 0 and s % 2 == 1 for s in window):
        raise ValueError(f"{name} must be 2 or 3 odd positive ints, e.g. (3, 3) or (3, 3, 3), got {window!r}")
    return window


class StructSA(SelfAttention):
    """Structural self-attention (Kim et al., CVPR 2024) as a drop-in attention layer.

    Queries, keys and values come from one ``qkv`` projection as in SA; every query's
    correlation map over the key grid is convolved with ``num_patterns`` learned
    pattern detectors ``u_k`` and values are aggregated with dynamic kernels built
    from ``u_v`` (see :func:`structvit.ops.struct_attention`). ConvSA is
    ``num_patterns=1``.

    Args:
        dim, num_heads, qkv_bias, attn_drop, proj_drop: as :class:`SelfAttention`.
        window: odd window sizes, (kh, kw) or (kt, kh, kw). A 2-D window used on a
            video grid acts on each frame, as (1, kh, kw); a 3-D window used on an image
            grid sees only its centre frame (the rest is zero padding).
        num_patterns: D, the number of structural patterns.
        normalize: "joint" (default) or "per_pattern"; see ``struct_attention``.
        share_patterns: one set of patterns for all heads instead of one per head.
        init: "random" -- truncated normal with std M ** -0.5 (M = window positions), so
            the scores start with the variance of SA's (our reading); "sa" -- the
            SA-equivalent initialisation: u_k[d] = centre delta, u_v[d] = centre delta
            (divided by D for "per_pattern") + e_d with sum_d e_d = 0, so the output equals
            SA with the same qkv/proj weights while the D patterns get different gradients.
        backend: "auto", "naive", "correlation", "keyconv" or "fused"; see ``struct_attention``.
            After a forward, ``last_backend`` says which one ran.
        memory_limit: bytes of attention-sized working memory each call may hold (None: the
            op's default, 1 GiB); e.g. ``8 << 20`` keeps a video layer's attention memory
            near SA's on CPU (see ``struct_attention``).
    """

    def __init__(self, dim: int, num_heads: int = 8, window: Sequence[int] = (3, 3), num_patterns: int = 8,
                 normalize: str = "joint", share_patterns: bool = False, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, init: str = "random", backend: str = "auto",
                 memory_limit: int | None = None):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.window = _window3(window)
        if not isinstance(num_patterns, int) or num_patterns < 1:
            raise ValueError(f"num_patterns must be a positive int, got {num_patterns!r}")
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
        if backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        check_memory_limit(memory_limit)
        self.memory_limit = memory_limit
        self.num_patterns = num_patterns
        self.normalize = normalize
        self.share_patterns = share_patterns
        self.backend = backend
        self.last_backend: str | None = None  # the backend the last forward ran ("auto" resolved)
        shape = ((1,) if share_patterns else (num_heads,)) + (num_patterns,) + self.window
        self.u_k = nn.Parameter(torch.empty(shape))
        self.u_v = nn.Parameter(torch.empty(shape))
        self.reset_patterns(init)

    @torch.no_grad()
    def reset_patterns(self, init: str = "random", noise_std: float = 0.02) -> None:
        """Re-initialise ``u_k`` and ``u_v``; ``init`` as in the constructor.

        ``noise_std`` is the std of the zero-sum perturbations e_d of ``init="sa"``.
        """
        if init == "random":
            std = self.u_k[0, 0].numel() ** -0.5
            for u in (self.u_k, self.u_v):
                nn.init.trunc_normal_(u, std=std, a=-2 * std, b=2 * std)
        elif init == "sa":
            delta = torch.zeros(self.window, dtype=self.u_k.dtype, device=self.u_k.device)
            delta[tuple(s // 2 for s in self.window)] = 1.0
            self.u_k.copy_(delta.expand_as(self.u_k))
            e = torch.empty_like(self.u_v)
            nn.init.trunc_normal_(e, std=noise_std, a=-2 * noise_std, b=2 * noise_std)
            if self.num_patterns > 1:
                e -= e.mean(dim=1, keepdim=True)
            else:
                e.zero_()  # a single pattern has no zero-sum perturbation but itself
            centre = 1.0 if self.normalize == "joint" else 1.0 / self.num_patterns
            self.u_v.copy_(centre * delta + e)
        else:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")

    def patterns_for(self, grid_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """u_k, u_v in the op's layout for a grid of rank 2 or 3."""
        u_k, u_v = self.u_k, self.u_v
        if self.share_patterns:
            u_k, u_v = u_k[0], u_v[0]
        if len(self.window) == 2 and grid_rank == 3:
            u_k, u_v = u_k.unsqueeze(-3), u_v.unsqueeze(-3)  # per-frame (1, kh, kw) window
        elif len(self.window) == 3 and grid_rank == 2:
            centre = self.window[0] // 2  # other frames of the window see only padding
            u_k, u_v = u_k[..., centre, :, :], u_v[..., centre, :, :]
        return u_k, u_v

    def forward(self, x: torch.Tensor, grid: Sequence[int], return_weights: bool = False):
        """x: (B, N, dim) on ``grid`` (H, W) or (T, H, W) -> (B, N, dim).

        With ``return_weights=True`` also returns the attention (B, heads, N, D, N).
        """
        q, k, v = self._qkv(x)
        grid = tuple(grid)
        u_k, u_v = self.patterns_for(len(grid))
        dropout_p = self.attn_drop if self.training else 0.0
        # resolved here so that what ran is visible (``last_backend``, e.g. for benchmarks)
        backend = resolve_backend(q, u_k, grid, backend=self.backend, return_weights=return_weights,
                                  dropout_p=dropout_p, memory_limit=self.memory_limit)
        self.last_backend = backend
        res = struct_attention(q, k, v, u_k, u_v, grid, normalize=self.normalize, backend=backend,
                               scale=self.scale, dropout_p=dropout_p, return_weights=return_weights,
                               memory_limit=self.memory_limit)
        if return_weights:
            return self._out(res[0]), res[1]
        return self._out(res)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, window={self.window}, num_patterns={self.num_patterns}, "
                f"normalize={self.normalize!r}, share_patterns={self.share_patterns}, backend={self.backend!r}"
                + (f", memory_limit={self.memory_limit}" if self.memory_limit is not None else ""))


def ConvSA(dim: int, num_heads: int = 8, window: Sequence[int] = (3, 3), **kwargs) -> StructSA:
    """Convolutional self-attention: StructSA with a single pattern (D = 1)."""
    return StructSA(dim, num_heads, window=window, num_patterns=1, **kwargs)
