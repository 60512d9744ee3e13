"""The numbers behind the figures: one query's attention weights recomputed from a block's
captured input (:class:`QueryAttention`, :func:`query_attention`), and the input sample as
the model takes it (:func:`prepare_sample`).

Notation: ``A`` has shape (heads, D, N') for the chosen query, over the N' keys of the
block (its key grid (T', H', W') = the token grid strided by the layer's ``kv_stride``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from .capture import AttentionCapture, capture, default_block, query_index

KIND_LABEL = {"sa": "SA", "convsa": "ConvSA", "structsa": "StructSA"}

# --------------------------------------------------------------------------- inputs


def prepare_sample(model: nn.Module, sample: torch.Tensor) -> torch.Tensor:
    """One sample as a batch of one on the model's device and dtype.

    Accepts (C, H, W) / (1, C, H, W) for image models and (C, T, H, W) / (1, C, T, H, W)
    for video models (``model.video``); a larger batch keeps its first element.
    """
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"sample must be a torch.Tensor, got {type(sample).__name__}")
    video = bool(getattr(model, "video", False))
    want = 4 if video else 3
    if sample.dim() == want:
        sample = sample.unsqueeze(0)
    if sample.dim() != want + 1:
        layout = "(C, T, H, W)" if video else "(C, H, W)"
        raise ValueError(f"sample must be {layout} or a batch of them for a {'video' if video else 'image'} model, "
                         f"got shape {tuple(sample.shape)}")
    p = next(model.parameters(), None)
    if p is not None:
        sample = sample.to(device=p.device, dtype=p.dtype)
    return sample[:1]



# --------------------------------------------------------------------------- numbers


@dataclass
class QueryAttention:
    """The attention of one query of one block, with what is needed to plot it."""

    capture: AttentionCapture
    sample: torch.Tensor  # (1, C, [T,] H, W)
    query: tuple[int, int, int]  # (t, h, w) on the block's grid
    query_index: int
    head: int
    normalize: str  # the reading of ``weights``
    weights: np.ndarray  # (heads, D, T', H', W'): A[head, d, j'] for this query, on the key grid
    u_k: np.ndarray | None  # (heads, cu, D, kt, kh, kw) or None for SA; cu = 1 unless channel-wise
    u_v: np.ndarray | None  # (heads, cu_v, D, kt, kh, kw) (its own window)
    channel: int | None = None  # channel shown of channel-wise patterns and kernels; None = the mean

    @property
    def grid3(self):
        return self.capture.grid3

    @property
    def key_grid3(self):
        return tuple(self.weights.shape[2:])

    @property
    def kv_stride3(self):
        return self.capture.kv_stride3

    @property
    def num_patterns(self) -> int:
        return self.weights.shape[1]

    @property
    def channelwise(self) -> bool:
        return self.u_v is not None and (self.u_v.shape[1] > 1 or self.u_k.shape[1] > 1)

    def head_weights(self) -> np.ndarray:
        """(D, T', H', W') for the chosen head."""
        return self.weights[self.head]

    def mass(self) -> np.ndarray:
        """(T', H', W'): attention on each key, summed over patterns."""
        return self.head_weights().sum(0)

    def top_keys(self, k: int) -> list[tuple[int, int, int]]:
        """The ``k`` most attended keys, as (t', h', w') on the key grid."""
        m = self.mass().reshape(-1)
        order = np.argsort(-m, kind="stable")[:k]
        T, H, W = self.key_grid3
        return [(int(i // (H * W)), int(i // W % H), int(i % W)) for i in order]

    def key_position(self, key) -> tuple[int, int, int]:
        """Grid position (t, h, w) of the centre of key ``key`` (t', h', w'): s * key per axis."""
        return tuple(int(k * s) for k, s in zip(key, self.kv_stride3))

    def _select(self, u: np.ndarray) -> np.ndarray:
        """(cu, D, ...) of the head -> (D, ...): the chosen channel, or the mean over channels."""
        if u.shape[0] == 1:
            return u[0]
        return u[self.channel] if self.channel is not None else u.mean(0)

    def pattern(self, which: str) -> np.ndarray:
        """"u_k" or "u_v" of the head as shown: (D, kt, kh, kw), channel ``channel`` or the channel mean."""
        return self._select(getattr(self, which)[self.head])

    def pattern_std(self, which: str) -> np.ndarray:
        """(D, kt, kh, kw): std of "u_k"/"u_v" over the head's channels (0 for the dot-product layouts)."""
        return getattr(self, which)[self.head].std(0)

    def kappa_channels(self, key) -> np.ndarray:
        """Dynamic kernels at key ``key`` (t', h', w'): sum_d A[d, key] U^V[c, d], (cu_v, kt, kh, kw)."""
        if self.u_v is None:
            raise TypeError("SA blocks have no dynamic kernels")
        a = self.head_weights()[(slice(None),) + tuple(key)]  # (D,)
        return np.einsum("d,cdthw->cthw", a, self.u_v[self.head])

    def kappa(self, key) -> np.ndarray:
        """Dynamic kernel at key ``key`` as shown: (kt, kh, kw), channel ``channel`` or the channel mean."""
        k = self.kappa_channels(key)
        if k.shape[0] == 1:
            return k[0]
        return k[self.channel] if self.channel is not None else k.mean(0)


def check_channel(channel, cap: AttentionCapture) -> int | None:
    if channel is None:
        return None
    width = cap.module.head_dim
    if isinstance(channel, bool) or not isinstance(channel, int) or not 0 <= channel < width:
        raise ValueError(f"channel must be an int in [0, {width}) (block {cap.index} has head width {width}) "
                         f"or None for the channel mean, got {channel!r}")
    return channel


def check_head(head, heads: int, what: str) -> int:
    if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < heads:
        raise ValueError(f"head must be an int in [0, {heads}) ({what} has {heads} heads), got {head!r}")
    return head


def query_attention(model: nn.Module, sample: torch.Tensor, block: int | None = None, query=None, head: int = 0,
                    normalize: str | None = None, captures: list[AttentionCapture] | None = None,
                    channel: int | None = None) -> QueryAttention:
    """Capture ``block``'s input on ``sample`` and recompute one query's attention.

    Args:
        model: a StructViT (or any module with StructViT attention layers).
        sample: one input, see :func:`prepare_sample`.
        block: attention block index (see :func:`structvit.viz.capture.attention_layers`);
            default: the structural block with the largest token grid.
        query: (h, w) / (t, h, w) or "h,w" / "t,h,w" on the block's token grid; default the centre.
        head: attention head.
        normalize: softmax reading, "joint" or "per_pattern"; default the layer's own.
        channel: the channel whose patterns and dynamic kernels are shown (channel-wise
            patterns); default None, the mean over the head's channels.
    """
    x = prepare_sample(model, sample)
    if captures is None:
        captures = capture(model, x, None if block is None else [block])
    if block is None:
        cap = default_block(captures)
    else:
        found = [c for c in captures if c.index == block]
        if not found:
            raise ValueError(f"block {block} was not captured")
        cap = found[0]
    qi, pos = query_index(query, cap.grid)
    head = check_head(head, cap.num_heads, f"block {cap.index}")
    channel = check_channel(channel, cap)
    w = cap.weights(normalize)[0, :, qi]  # (heads, D, N')
    w = w.reshape(w.shape[0], w.shape[1], *cap.key_grid3).float().cpu().numpy()
    u_k = u_v = None
    if cap.kind != "sa":
        uk, uv = cap.patterns()
        u_k, u_v = uk.float().cpu().numpy(), uv.float().cpu().numpy()
    reading = normalize or getattr(cap.module, "normalize", "joint")
    return QueryAttention(cap, x, pos, qi, head, reading if cap.kind != "sa" else "softmax", w, u_k, u_v, channel)


def common_arrays(qa: QueryAttention, model_name: str | None = None) -> dict:
    layout = getattr(qa.capture.module, "patterns", "sa")
    return dict(query=np.array(qa.query), query_index=np.array(qa.query_index), grid=np.array(qa.grid3),
                key_grid=np.array(qa.key_grid3), kv_stride=np.array(qa.kv_stride3),
                block=np.array(qa.capture.index), block_name=np.array(qa.capture.name), head=np.array(qa.head),
                kind=np.array(qa.capture.kind), normalize=np.array(qa.normalize), patterns=np.array(layout),
                channel=np.array(-1 if qa.channel is None else qa.channel))


def channel_text(qa: QueryAttention) -> str:
    if not qa.channelwise:
        return ""
    return f"channel {qa.channel}" if qa.channel is not None else "mean over channels"


def pattern_arrays(qa: QueryAttention) -> dict:
    """The patterns and their channel statistics of the head, for the .npz files."""
    h = qa.head
    return dict(u_k=qa.pattern("u_k"), u_v=qa.pattern("u_v"), u_k_std=qa.pattern_std("u_k"),
                u_v_std=qa.pattern_std("u_v"), u_k_channels=qa.u_k[h], u_v_channels=qa.u_v[h])



def query_label(qa: QueryAttention) -> str:
    q = qa.query if qa.grid3[0] > 1 else qa.query[1:]
    g = qa.grid3 if qa.grid3[0] > 1 else qa.grid3[1:]
    text = (f"block {qa.capture.index} ({qa.capture.name}, {KIND_LABEL[qa.capture.kind]}"
            + (f", {qa.capture.module.patterns} patterns" if qa.u_v is not None else "")
            + f"), head {qa.head}, query {tuple(q)} on the {'x'.join(map(str, g))} token grid")
    if qa.kv_stride3 != (1, 1, 1):
        kg = qa.key_grid3 if qa.grid3[0] > 1 else qa.key_grid3[1:]
        st = qa.kv_stride3 if qa.grid3[0] > 1 else qa.kv_stride3[1:]
        text += f", keys on the {'x'.join(map(str, kg))} grid (kv_stride {tuple(st)})"
    return text


def reading_text(normalize: str) -> str:
    if normalize == "joint":
        return ("joint softmax: one distribution over all (pattern d, key j) pairs; "
                "maps share one colour scale, titles give each pattern's share of the total")
    if normalize == "per_pattern":
        return "per-pattern softmax: each map is its own distribution over keys (sums to 1), own colour scale"
    return "softmax over keys"


