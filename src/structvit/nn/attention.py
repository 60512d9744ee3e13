"""Attention modules over a token grid: plain self-attention and StructSA.

Both take ``x`` of shape (B, N, dim) and the grid (H, W) or (T, H, W) the N tokens
lie on, and share the parameter names ``qkv`` and ``proj`` (those of timm and
UniFormer), so a state dict moves between them. StructSA adds ``u_k`` and ``u_v``.

Both validate their configuration when built; StructSA's forward calls the op's unchecked
inner function with its patterns already in the op's canonical layout.

TorchScript and torch.fx: both modules script (``torch.jit.script``); StructSA's call of
the op is Python (``@torch.jit.ignore``: the backend dispatch is Python), so a scripted model
runs but cannot be saved with ``torch.jit.save`` (``torch.export`` serialises it). For
torch.fx both are leaf modules (registered with timm by ``structvit.models``): the grid
they are given is then a traced value.
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import BACKEND_NAMES, NORMALIZE, PATTERN_LAYOUTS, canonical_grid, struct_attention_unchecked
from ..ops.dispatch import unsupported
from ..ops.checks import check_choice, check_positive_int, check_stride, check_window
from ..ops.functional import check_memory_limit

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

    def _check_tokens(self, x: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (B, N, {self.dim}), got {tuple(x.shape)}")

    def _qkv(self, x: torch.Tensor):
        """(B, N, dim) -> three (B, heads, N, head_dim)."""
        if not torch.jit.is_scripting():
            self._check_tokens(x)
        b, n = x.shape[0], x.shape[1]
        return self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, head_dim) -> (B, N, dim)."""
        b, n = y.shape[0], y.shape[2]
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(b, n, self.dim)))

    def forward(self, x: torch.Tensor, grid: Optional[List[int]] = None) -> torch.Tensor:
        """x: (B, N, dim); grid is accepted for a common signature and checked, not needed."""
        q, k, v = self._qkv(x)
        if grid is not None and not torch.jit.is_scripting():
            canonical_grid(grid, x.shape[1])
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self._out(y)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"


def _odd_sizes(window, name: str) -> tuple[int, ...]:
    return check_window(name, window)


def _stride_sizes(kv_stride, rank: int) -> tuple[int, ...]:
    return check_stride("kv_stride", kv_stride, rank)


def _canonical(u: torch.Tensor, patterns: str, window_rank: int, grid_rank: int, dtype: torch.dtype) -> torch.Tensor:
    """A pattern parameter in the ``patterns`` layout with a window of ``window_rank`` as the op's
    canonical (hu, cu, D, kt, kh, kw) for a grid of rank 2 or 3."""
    if patterns != "channel":
        u = u.unsqueeze(-window_rank - 2)  # cu = 1
    if patterns == "shared":
        u = u.unsqueeze(0)  # hu = 1
    if window_rank == 2:
        u = u.unsqueeze(-3)  # per-frame (1, kh, kw) window on a video grid; kt = 1 on an image
    elif grid_rank == 2:
        centre = u.shape[-3] // 2  # other frames of the window see only padding
        u = u[..., centre:centre + 1, :, :]
    return u if u.dtype == dtype else u.to(dtype)  # autocast: the patterns follow q


def _stride_for(kv_stride: tuple[int, ...], grid_rank: int) -> tuple[int, int, int]:
    """A layer's key/value stride as (st, sh, sw) for a grid of rank 2 or 3."""
    return (1,) + kv_stride[-2:] if len(kv_stride) == 2 or grid_rank == 2 else kv_stride


def _record_backend(module, backend: str) -> None:
    """``last_backend`` of a Python StructSA; a scripted one has no such attribute (TorchScript
    fixes a module's attributes), so it is not recorded there."""
    # (an ignored method may see the C++ torch._C.ScriptModule, which is no nn.Module)
    if isinstance(module, nn.Module) and not isinstance(module, torch.jit.ScriptModule):
        module.last_backend = backend


def _zero_sum_noise(u: torch.Tensor, pattern_dim: int, std: float) -> torch.Tensor:
    """Truncated-normal perturbations shaped like ``u`` that sum to zero over the patterns
    (none for a single pattern: it has no zero-sum perturbation but itself)."""
    e = torch.empty_like(u)
    nn.init.trunc_normal_(e, std=std, a=-2 * std, b=2 * std)
    if u.shape[pattern_dim] > 1:
        return e - e.mean(dim=pattern_dim, keepdim=True)
    return e.zero_()


class StructSA(SelfAttention):
    """Structural self-attention (Kim et al., CVPR 2024) as a drop-in attention layer.

    Queries, keys and values come from one ``qkv`` projection as in SA; each query's
    correlation with the key grid is convolved with ``num_patterns`` learned pattern
    detectors ``u_k`` and values are aggregated with the ``u_v`` aggregators (see
    :func:`structvit.ops.struct_attention`). ConvSA is ``num_patterns=1``.

    Args:
        dim, num_heads, qkv_bias, attn_drop, proj_drop: as :class:`SelfAttention`.
        window: odd key window sizes, (kh, kw) or (kt, kh, kw). A 2-D window used on a
            video grid acts on each frame, as (1, kh, kw); a 3-D window used on an image
            grid sees only its centre frame (the rest is zero padding).
        num_patterns: D, the number of structural patterns (the paper's default: 4).
        patterns: "channel" (default, the paper's: ``u_k``, ``u_v`` of shape
            (heads, head_dim, D, *window), one filter per channel and pattern), "head"
            (the dot-product variant: (heads, D, *window), shared by a head's channels) or
            "shared" ((D, *window), shared by all heads).
        window_v: the value (aggregator) window, default ``window``; same rank.
        kv_stride: key/value stride, an int or one int per window axis: keys and values
            are taken at every s-th grid position (D * N / s^r keys; the paper's
            StructViT-X-D-2 models use 2, spatially).
        normalize: "joint" (default) or "per_pattern"; see ``struct_attention``.
        init: "random" -- truncated normal with std M ** -0.5 (M = window positions), so
            the scores start with the variance of SA's (our reading), except that a
            one-position window (1x1, 1x1x1) has no structure to draw: its patterns are
            per-channel gains and start as in "sa" (SA's gain, zero-sum e_d on ``u_v``), so a
            1x1 StructSA starts as SA; "sa" -- the
            SA-equivalent initialisation: every detector a centre delta, every aggregator a
            centre delta (divided by D for "per_pattern") plus e_d with sum_d e_d = 0 (per
            channel for channel-wise patterns), so the output equals SA with the same
            qkv/proj weights (exactly at ``kv_stride=1``; with a stride it is only a start)
            while the D patterns get different gradients.
        backend: "auto", "naive", "correlation", "keyconv" or "fused"; see
            ``struct_attention``. After a forward, ``last_backend`` says which one ran.
        memory_limit: bytes of attention-sized working memory each call may hold (None: the
            op's default, 1 GiB); e.g. ``8 << 20`` keeps a video layer's attention memory
            near SA's on CPU.
    """

    # a Python attribute, not part of a scripted module (see ``_record_backend``)
    __jit_ignored_attributes__ = ["last_backend"]

    def __init__(self, dim: int, num_heads: int = 8, window: Sequence[int] = (3, 3), num_patterns: int = 4, *,
                 patterns: str = "channel", window_v: Sequence[int] | None = None, kv_stride=1,
                 normalize: str = "joint", qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 init: str = "random", backend: str = "auto", memory_limit: int | None = None):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.window = _odd_sizes(window, "window")
        self.window_v = self.window if window_v is None else _odd_sizes(window_v, "window_v")
        if len(self.window_v) != len(self.window):
            raise ValueError(f"window_v must have the rank of window {self.window}, got {self.window_v}")
        self.kv_stride = _stride_sizes(kv_stride, len(self.window))
        check_positive_int("num_patterns", num_patterns)
        check_choice("patterns", patterns, PATTERN_LAYOUTS)
        check_choice("normalize", normalize, NORMALIZE)
        check_choice("backend", backend, BACKEND_NAMES)
        check_choice("init", init, INITS)
        check_memory_limit(memory_limit)
        reason = unsupported(backend, channelwise=patterns == "channel", strided=any(s > 1 for s in self.kv_stride),
                             same_window=self.window == self.window_v) if backend != "auto" else None
        if reason:
            raise ValueError(f"backend={backend!r} cannot serve this layer: {reason}")
        self.memory_limit = memory_limit
        self.num_patterns = num_patterns
        self.patterns = patterns
        self.normalize = normalize
        self.backend = backend
        self.last_backend: str | None = None  # the backend the last forward ran ("auto" resolved)
        lead = {"channel": (num_heads, self.head_dim), "head": (num_heads,), "shared": ()}[patterns]
        self.u_k = nn.Parameter(torch.empty(lead + (num_patterns,) + self.window))
        self.u_v = nn.Parameter(torch.empty(lead + (num_patterns,) + self.window_v))
        self.reset_patterns(init)

    def _apply(self, fn, recurse=True):
        # model.to(memory_format=torch.channels_last) gives every 4-D and 5-D tensor that memory
        # format, and a 5-D one raises ("required rank 4 tensor"). The patterns are no image maps:
        # they are moved and cast as flat views and keep their shape and default layout.
        def keep_pattern_layout(t):
            if t.dim() in (4, 5):
                return fn(t.reshape(-1)).view(t.shape)
            return fn(t)

        return super()._apply(keep_pattern_layout, recurse)

    @property
    def pattern_dim(self) -> int:
        """The index of D in ``u_k`` / ``u_v``."""
        return {"channel": 2, "head": 1, "shared": 0}[self.patterns]

    @torch.no_grad()
    def reset_patterns(self, init: str = "random", noise_std: float = 0.02) -> None:
        """Re-initialise ``u_k`` and ``u_v``; ``init`` as in the constructor.

        ``noise_std`` is the std of the zero-sum perturbations e_d of ``init="sa"`` (and of a
        one-tap ``u_v`` under ``init="random"``).
        """
        check_choice("init", init, INITS)
        value_centre = 1.0 if self.normalize == "joint" else 1.0 / self.num_patterns
        if init == "random":
            for u, centre in ((self.u_k, 1.0), (self.u_v, value_centre)):
                m = math.prod(u.shape[-len(self.window):])
                if m > 1:
                    std = m ** -0.5
                    nn.init.trunc_normal_(u, std=std, a=-2 * std, b=2 * std)
                else:
                    # A one-tap pattern is only a per-channel gain, and the softmax mixes the D
                    # copies of a token, so the layer starts with the gain mean_d u. Zero-mean
                    # draws made that ~0.4 rms (std 1 over D = 4), which kept the attention
                    # uniform for the whole budget of the paper study (docs/usage/studies.md,
                    # Table 1b). Start at SA's gain instead, as init="sa" does.
                    u.fill_(centre)
            if math.prod(self.window_v) == 1:
                self.u_v.add_(_zero_sum_noise(self.u_v, self.pattern_dim, noise_std))
            return
        for u, window in ((self.u_k, self.window), (self.u_v, self.window_v)):
            delta = torch.zeros(window, dtype=u.dtype, device=u.device)
            delta[tuple(s // 2 for s in window)] = 1.0
            u.copy_(delta.expand_as(u))
        self.u_v.mul_(value_centre).add_(_zero_sum_noise(self.u_v, self.pattern_dim, noise_std))

    # canonical_patterns / stride_for delegate to functions of the attributes, which ``_attend``
    # also calls: under TorchScript it runs on the scripted module, which has no Python methods.
    def canonical_patterns(self, grid_rank: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """u_k, u_v in the op's canonical layout (hu, cu, D, kt, kh, kw) for a grid of rank 2 or 3."""
        dtype = self.u_k.dtype if dtype is None else dtype
        return (_canonical(self.u_k, self.patterns, len(self.window), grid_rank, dtype),
                _canonical(self.u_v, self.patterns, len(self.window), grid_rank, dtype))

    def stride_for(self, grid_rank: int) -> tuple[int, int, int]:
        """The key/value stride as (st, sh, sw) for a grid of rank 2 or 3."""
        return _stride_for(self.kv_stride, grid_rank)

    @torch.jit.ignore
    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: List[int],
                return_weights: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The op on (B, heads, N, head_dim) q, k, v: (out, weights or None). Python (the
        backend dispatch), also under TorchScript."""
        grid3 = canonical_grid(grid, q.shape[2])
        rank = len(grid)
        u_k = _canonical(self.u_k, self.patterns, len(self.window), rank, q.dtype)
        u_v = _canonical(self.u_v, self.patterns, len(self.window), rank, q.dtype)
        dropout_p = self.attn_drop if self.training else 0.0
        out, weights, backend = struct_attention_unchecked(
            q, k, v, u_k, u_v, grid3, _stride_for(self.kv_stride, rank), self.normalize, self.backend, self.scale, dropout_p,
            return_weights, self.memory_limit)
        _record_backend(self, backend)
        return out, weights

    @torch.jit.export
    def forward_with_prefix(self, x: torch.Tensor, grid: List[int], num_prefix: int) -> torch.Tensor:
        """Attention of ``num_prefix`` leading tokens (a class token) and a token grid.

        x: (B, P + N, dim), the P prefix tokens first, then the N = prod(grid) grid tokens
        -> (B, P + N, dim). The prefix queries attend to all P + N keys with ordinary
        attention (scores q.k * scale, one softmax); the grid queries run StructSA over the
        grid tokens only (they do not see the prefix). Both use the layer's ``qkv`` and
        ``proj``. Exported: a scripted layer has it as a method too.
        """
        q, k, v = self._qkv(x)  # (B, heads, P + N, head_dim) each
        p = num_prefix
        dropout_p = self.attn_drop if self.training else 0.0
        prefix = F.scaled_dot_product_attention(q[:, :, :p], k, v, dropout_p=dropout_p, scale=self.scale)
        # contiguous grid parts: some backends want unit strides beyond the channel dim
        out, _ = self._attend(q[:, :, p:].contiguous(), k[:, :, p:].contiguous(), v[:, :, p:].contiguous(), grid,
                              False)
        return self._out(torch.cat([prefix, out], dim=2))

    def forward(self, x: torch.Tensor, grid: List[int], return_weights: bool = False):
        """x: (B, N, dim) on ``grid`` (H, W) or (T, H, W) -> (B, N, dim).

        With ``return_weights=True`` also returns the attention (B, heads, N, D, N')
        (not under TorchScript, where forward has one return type).
        """
        q, k, v = self._qkv(x)
        if torch.jit.is_scripting():
            if return_weights:
                raise RuntimeError("StructSA: return_weights=True is not available under TorchScript")
            out, _ = self._attend(q, k, v, grid, False)
            return self._out(out)
        else:
            out, weights = self._attend(q, k, v, grid, return_weights)
            return (self._out(out), weights) if return_weights else self._out(out)

    def extra_repr(self) -> str:
        extra = [f"dim={self.dim}", f"num_heads={self.num_heads}", f"window={self.window}",
                 f"num_patterns={self.num_patterns}", f"patterns={self.patterns!r}"]
        if self.window_v != self.window:
            extra.append(f"window_v={self.window_v}")
        if any(s > 1 for s in self.kv_stride):
            extra.append(f"kv_stride={self.kv_stride}")
        extra += [f"normalize={self.normalize!r}", f"backend={self.backend!r}"]
        if self.memory_limit is not None:
            extra.append(f"memory_limit={self.memory_limit}")
        return ", ".join(extra)


def ConvSA(dim: int, num_heads: int = 8, window: Sequence[int] = (3, 3), **kwargs) -> StructSA:
    """Convolutional self-attention: StructSA with a single pattern (D = 1); channel-wise,
    it is attention over depthwise-convolved keys and values (the ConvSA of CvT/MViT)."""
    return StructSA(dim, num_heads, window=window, num_patterns=1, **kwargs)
