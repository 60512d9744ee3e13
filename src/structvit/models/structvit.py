"""StructViT (Kim et al., CVPR 2024): UniFormer's four-stage backbone with structural
self-attention (StructSA) in every attention block.

One implementation serves images and video. An image model (``num_frames=None``)
uses 2-D convolutions and sees (B, C, H, W) maps; a video model (``num_frames`` an
int, the default clip length) uses 3-D convolutions and sees (B, C, T, H, W) maps.
Every block works on a map of either rank: attention blocks flatten the trailing
grid, (H, W) or (T, H, W), into tokens and hand that grid to the attention layer.

Registered models (``timm.create_model(name)``), named as in the paper:
StructViT-X-D-S = size X (S, B, L), D structural patterns, key/value stride S:

- image (224², 1000 classes): ``structvit_s_4_2``, ``structvit_s_4_1``, ``structvit_s_8_1``,
  ``structvit_b_4_2``, ``structvit_b_4_1``, ``structvit_b_8_1``, ``structvit_l_4_1``;
- video (Kinetics-400, 400 classes): the same names with ``_video``; clips of 16 frames
  (S) or 32 frames (B, L) by default;
- ``structvit_tiny``, ``structvit_tiny_video``: small models with the paper's defaults
  (channel-wise patterns, D = 4, stride 1) for CPU experiments;
- dense prediction (:mod:`.structvit_dense`): ``structvit_{s,b}_4_1_h{14,32}``, UniFormer's
  hybrid windowed stage 3 (``window_size``) with a norm on each stage output (``dense=True``).

Paper defaults: channel-wise StructSA (``patterns="channel"``) with one joint softmax
over the D*N scores, windows 3x3 (images) and 3x3x3 (video), in every attention block
of stages 3 and 4; stochastic depth 0.1 / 0.3 / 0.4 for S / B / L; head dropout 0.5
for video. Choices the paper leaves open, all configurable (our reading):

- the key/value stride S of a video model is spatial only, (1, S, S): the published
  video FLOPs fit it, a (S, S, S) stride would undercut them;
- the patterns start random (``pattern_init="random"``); ``"sa"`` is the
  SA-equivalent start used when converting an SA checkpoint;
- ``struct_blocks=(a, b)`` (StructSA in the last ``a`` blocks of stage 3 and the last
  ``b`` of stage 4, SA elsewhere) is kept for experiments; ``(0, 0)`` is UniFormer.

Layer structure and parameter names follow the official UniFormer models
(Sense-X/UniFormer, ``image_classification/models/uniformer.py`` and
``video_classification/slowfast/models/uniformer.py``), so their published state
dicts load: ``patch_embed{1..4}.{proj,norm}``, ``blocks{1..4}.{i}`` (convolution
blocks: ``pos_embed, norm1, conv1, attn, conv2, norm2, mlp.fc1, mlp.fc2``; attention
blocks: ``pos_embed, norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2``), ``norm``
(BatchNorm) and ``head``. StructSA/ConvSA blocks add ``attn.u_k`` and ``attn.u_v``
(channel-wise: (heads, head_dim, D, *window)).

TorchScript, torch.fx and torch.export: the models script (``torch.jit.script``; the StructSA
op runs through Python there, so a scripted model cannot be ``torch.jit.save``-d) and trace
with torch.fx with timm's leaf modules (SelfAttention and StructSA are registered with
``timm.layers.register_notrace_module``, so ``timm.create_model(..., features_only=True,
feature_cls="fx")`` works); ``torch.export.export`` gives a serialisable graph.
"""
import dataclasses
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, register_notrace_module, trunc_normal_
from timm.models import PretrainedCfg, build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..nn.attention import SelfAttention, StructSA
from ..nn.dwconv import DepthwiseConv2d, DepthwiseConv3d, depthwise_conv
from ..ops.backends.keyconv import pattern_conv
from ..ops.checks import are_sizes, check_stride, is_int

__all__ = ["StructViT", "ConvBlock", "AttentionBlock", "PatchEmbed", "ATTENTION_KINDS", "VideoPretrainedCfg",
           "PAPER_MODELS", "default_cfgs", "WINDOW_CONVS", "WINDOW_PATTERNS", "window_partition", "window_merge"]

ATTENTION_KINDS = ("structsa", "convsa")

# torch.fx leaves: the attention layers take the grid as Python ints (the op dispatches on them)
register_notrace_module(SelfAttention)
register_notrace_module(StructSA)
register_notrace_module(DepthwiseConv2d)  # CUDA dispatch in Python
register_notrace_module(DepthwiseConv3d)


@torch.jit.ignore
def _check_input(x: torch.Tensor, video: bool, min_size: int = 1) -> None:
    """Python (also under TorchScript), a leaf under torch.fx (``torch.fx.wrap`` below).
    ``min_size``: the smallest height and width every stage can embed (the last stage's stride)."""
    want = 5 if video else 4
    if not isinstance(x, torch.Tensor) or x.dim() != want:
        layout = "(B, C, T, H, W)" if video else "(B, C, H, W)"
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{'video' if video else 'image'} model expects input {layout}, got {got}")
    if x.shape[-2] < min_size or x.shape[-1] < min_size:
        raise ValueError(f"the model's minimum input size is {min_size}x{min_size} pixels (the last stage's "
                         f"stride), got {x.shape[-2]}x{x.shape[-1]}")


def token_grid(x: torch.Tensor) -> List[int]:
    """The grid (H, W) or (T, H, W) of a (B, C, *grid) map, as Python ints (a leaf under torch.fx)."""
    return [int(s) for s in x.shape[2:]]


torch.fx.wrap("_check_input")
torch.fx.wrap("token_grid")


def _conv_cls(video: bool):
    return nn.Conv3d if video else nn.Conv2d


def _bn_cls(video: bool):
    return nn.BatchNorm3d if video else nn.BatchNorm2d


def _cube(size: int, video: bool, time: int | None = None) -> tuple[int, ...]:
    """(size, size) for images, (time or size, size, size) for video."""
    return (size if time is None else time, size, size) if video else (size, size)


def init_weights(m: nn.Module) -> None:
    """Linear layers: truncated normal (std 0.02), zero bias; LayerNorm: ones and zeros (timm's ViT init)."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- blocks


class ConvMlp(nn.Module):
    """Two 1x1 (1x1x1) convolutions with GELU between: UniFormer's ``CMlp``."""

    def __init__(self, dim: int, hidden: int, video: bool, drop: float = 0.0):
        super().__init__()
        conv = _conv_cls(video)
        self.fc1 = conv(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = conv(hidden, dim, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class ConvBlock(nn.Module):
    """Stages 1-2 (UniFormer's ``CBlock``): local aggregation by convolutions.

    ``x + pos_embed(x)`` (depthwise 3x3 / 3x3x3); ``x + conv2(attn(conv1(norm1(x))))``
    with ``attn`` a depthwise 5x5 / 5x5x5 convolution; ``x + mlp(norm2(x))``.
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0,
                 video: bool = False):
        super().__init__()
        conv, bn = _conv_cls(video), _bn_cls(video)
        self.pos_embed = depthwise_conv(dim, 3, video)
        self.norm1 = bn(dim)
        self.conv1 = conv(dim, dim, 1)
        self.attn = depthwise_conv(dim, 5, video)
        self.conv2 = conv(dim, dim, 1)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = bn(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), video, drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        x = x + self.drop_path(self.conv2(self.attn(self.conv1(self.norm1(x)))))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def window_partition(t: torch.Tensor, grid: List[int], window_size: int) -> torch.Tensor:
    """(B, H*W, C) tokens on ``grid`` (H, W) -> (B * nW, ws * ws, C) windows, row-major.

    The map is padded at the bottom and right with zero tokens to a multiple of ``ws``
    (UniFormer's ``SABlock_Windows``); window ``(i, j)`` is ``b * nW + i * (Wp / ws) + j``.
    """
    b, c = t.shape[0], t.shape[2]
    h, w = grid[0], grid[1]
    ws = window_size
    pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
    x = F.pad(t.reshape(b, h, w, c), (0, 0, 0, pad_r, 0, pad_b))
    nh, nw = (h + pad_b) // ws, (w + pad_r) // ws
    x = x.reshape(b, nh, ws, nw, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b * nh * nw, ws * ws, c)


def window_merge(windows: torch.Tensor, grid: List[int], window_size: int) -> torch.Tensor:
    """The inverse of :func:`window_partition`: (B * nW, ws * ws, C) -> (B, H*W, C), padding cropped."""
    h, w = grid[0], grid[1]
    ws = window_size
    nh, nw = (h + ws - 1) // ws, (w + ws - 1) // ws
    c = windows.shape[2]
    b = windows.shape[0] // (nh * nw)
    x = windows.reshape(b, nh, nw, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, nh * ws, nw * ws, c)
    return x[:, :h, :w].reshape(b, h * w, c)


torch.fx.wrap("window_partition")
torch.fx.wrap("window_merge")

WINDOW_CONVS = ("window", "map")
WINDOW_PATTERNS = ("hybrid", "all")
DENSE_STRIDE = 32  # the last stage's stride: dense backbones pad their input to a multiple of it


def window_uses(window_pattern: str, index: int) -> bool:
    """Whether stage-3 block ``index`` (0-based) attends in windows: "all", or "hybrid"
    (UniFormer's h14 / h32: every 4th block, (index + 1) % 4 == 0, attends globally)."""
    return window_pattern == "all" or (index + 1) % 4 != 0


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """(B, C, H, W) zero-padded at the bottom and right to H, W multiples of ``multiple``."""
    h, w = x.shape[-2], x.shape[-1]
    return F.pad(x, (0, (multiple - w % multiple) % multiple, 0, (multiple - h % multiple) % multiple))


torch.fx.wrap("pad_to_multiple")


@torch.jit.ignore
def map_conv_window_attention(attn: nn.Module, t: torch.Tensor, grid: List[int], window_size: int) -> torch.Tensor:
    """Windowed StructSA whose key/value patterns convolve the whole (padded) map first.

    ``window_conv="map"``: q, k, v of the zero-padded map, K^d and V^d by the D patterns
    over the whole padded map (a window's edge keys see the neighbouring window's tokens),
    then attention of each window's queries over its own D * ws * ws convolved keys. Always
    the key-convolution form (form 3), key/value stride 1 only; eager only (not under
    TorchScript).

    Args:
        attn: a :class:`StructSA` layer.
        t: (B, H*W, C) normalised tokens on ``grid`` (H, W).
    Returns:
        (B, H*W, C).
    """
    if attn.stride_for(2) != (1, 1, 1):
        raise ValueError(f"window_conv='map' needs key/value stride 1, got kv_stride={attn.kv_stride}")
    ws = window_size
    h, w = grid
    b, c = t.shape[0], t.shape[2]
    hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
    x = F.pad(t.reshape(b, h, w, c), (0, 0, 0, wp - w, 0, hp - h)).reshape(b, hp * wp, c)
    q, k, v = attn._qkv(x)  # (B, heads, Np, hd)
    u_k, u_v = attn.canonical_patterns(2, q.dtype)
    d = u_k.shape[2]
    kd = pattern_conv(k, u_k, (1, hp, wp))  # (B, heads, D, Np, hd)
    vd = pattern_conv(v, u_v, (1, hp, wp))
    heads, hd = q.shape[1], q.shape[3]
    nh, nw = hp // ws, wp // ws

    def windows(z: torch.Tensor) -> torch.Tensor:  # (B, heads, [D,] Np, e) -> (B * nW, heads, [D,] ws * ws, e)
        lead = z.shape[2:-2]
        z = z.reshape(b, heads, *lead, nh, ws, nw, ws, z.shape[-1])
        r = len(lead)
        z = z.permute(0, 2 + r, 4 + r, 1, *range(2, 2 + r), 3 + r, 5 + r, 6 + r)
        return z.reshape(b * nh * nw, heads, *lead, ws * ws, z.shape[-1])

    qw, kw_, vw = windows(q), windows(kd), windows(vd)
    dropout_p = attn.attn_drop if attn.training else 0.0
    if attn.normalize == "joint":
        y = F.scaled_dot_product_attention(qw, kw_.flatten(2, 3), vw.flatten(2, 3), dropout_p=dropout_p,
                                           scale=attn.scale)
    else:
        y = F.scaled_dot_product_attention(qw.unsqueeze(2).expand(-1, -1, d, -1, -1), kw_, vw,
                                           dropout_p=dropout_p, scale=attn.scale).sum(2)
    # (B * nW, heads, ws * ws, hd) -> (B, heads, Np, hd), cropped to the map
    y = y.reshape(b, nh, nw, heads, ws, ws, hd).permute(0, 3, 1, 4, 2, 5, 6).reshape(b, heads, hp, wp, hd)
    y = y[:, :, :h, :w].reshape(b, heads, h * w, hd)
    return attn._out(y)


class AttentionBlock(nn.Module):
    """Stages 3-4 (UniFormer's ``SABlock``) with SA, ConvSA or StructSA as ``attn``.

    ``x + pos_embed(x)``; then over the tokens of the whole (T, H, W) / (H, W) grid,
    ``x + attn(norm1(x))`` and ``x + mlp(norm2(x))`` (pre-norm transformer block).

    With ``window_size`` (image models; UniFormer's ``SABlock_Windows``) ``attn`` runs within
    non-overlapping ``ws x ws`` windows of the normalised map, padded at the bottom and right
    with zero tokens (which take part as keys, no mask) and cropped back after. A StructSA
    window is its own grid, zeros beyond its edges (``window_conv="window"``, our reading), or
    its patterns convolve the whole map first (``window_conv="map"``).
    """

    window_size: Optional[int]

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0,
                 video: bool = False, window_size: Optional[int] = None, window_conv: str = "window"):
        super().__init__()
        if window_size is not None and (video or not is_int(window_size)
                                        or window_size < 1):
            raise ValueError(f"window_size must be None or a positive int (image models only), got {window_size!r}"
                             + (" for a video model" if video else ""))
        if window_conv not in WINDOW_CONVS:
            raise ValueError(f"window_conv must be one of {WINDOW_CONVS}, got {window_conv!r}")
        self.pos_embed = depthwise_conv(dim, 3, video)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = attn
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.window_size = window_size
        self.window_conv = window_conv
        self.attn_has_patterns = isinstance(attn, StructSA)  # SA has no patterns: "map" is plain windows

    @torch.jit.ignore
    def _map_windowed(self, t: torch.Tensor, grid: List[int], window_size: int) -> torch.Tensor:
        return map_conv_window_attention(self.attn, t, grid, window_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        shape = x.shape
        grid = token_grid(x)
        t = x.flatten(2).transpose(1, 2)  # (B, N, C)
        ws = self.window_size
        if ws is None:
            a = self.attn(self.norm1(t), grid)
        elif self.window_conv == "map" and self.attn_has_patterns:
            a = self._map_windowed(self.norm1(t), grid, ws)
        else:
            a = window_merge(self.attn(window_partition(self.norm1(t), grid, ws), [ws, ws]), grid, ws)
        t = t + self.drop_path(a)
        t = t + self.drop_path(self.mlp(self.norm2(t)))
        return t.transpose(1, 2).reshape(shape)

    def extra_repr(self) -> str:
        return "" if self.window_size is None else f"window_size={self.window_size}, window_conv={self.window_conv!r}"


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: a strided convolution, then LayerNorm over channels.

    Image: kernel = stride = ``patch``. Video stem (``temporal=3``): kernel
    (3, p, p), stride (2, p, p), temporal padding 1 (time halved once); later video
    embeddings (``temporal=1``): kernel = stride = (1, p, p).
    """

    def __init__(self, in_chans: int, embed_dim: int, patch: int, video: bool = False, temporal: int = 1):
        super().__init__()
        if video and temporal == 3:
            self.proj = nn.Conv3d(in_chans, embed_dim, (3, patch, patch), stride=(2, patch, patch), padding=(1, 0, 0))
        else:
            k = _cube(patch, video, time=1)
            self.proj = _conv_cls(video)(in_chans, embed_dim, k, stride=k)
        self.norm = nn.LayerNorm(embed_dim)  # UniFormer: default eps here, 1e-6 in the blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        last = x.dim() - 1  # explicit positive dims: ONNX Transpose takes no negative perm
        # contiguous: CPU bf16 depthwise conv3d (the next block's pos_embed) computes wrong weight
        # gradients for a channels-last input
        return self.norm(x.movedim(1, last)).movedim(last, 1).contiguous()


# --------------------------------------------------------------------------- model


def _check_struct_blocks(struct_blocks, depths: Sequence[int]) -> tuple[int, int]:
    if isinstance(struct_blocks, str):
        if struct_blocks != "all":
            raise ValueError(f"struct_blocks must be 'all' or a pair (a, b) of block counts, got {struct_blocks!r}")
        return depths[2], depths[3]
    if not are_sizes(struct_blocks, minimum=0) or len(struct_blocks) != 2:
        raise ValueError(f"struct_blocks must be 'all' or a pair (a, b) of non-negative ints, got {struct_blocks!r}")
    a, b = struct_blocks
    if a > depths[2] or b > depths[3]:
        raise ValueError(f"struct_blocks={tuple(struct_blocks)} asks for more StructSA blocks than stages 3 and 4 "
                         f"have (depths {depths[2]} and {depths[3]})")
    return a, b


def _check_window(window, rank: int, video: bool, name: str) -> tuple[int, ...]:
    if isinstance(window, int) or window is None or len(tuple(window)) != rank:
        kind = "a video model needs (kt, kh, kw)" if video else "an image model needs (kh, kw)"
        raise ValueError(f"{name} must have {rank} sizes ({kind}), got {window!r}")
    window = tuple(window)
    if not are_sizes(window, odd=True):
        raise ValueError(f"{name} sizes must be odd positive ints, got {window!r}")
    return window


def _check_kv_stride(kv_stride, rank: int, video: bool) -> tuple[int, ...]:
    """An int S means (S, S) for images and (1, S, S) for video (spatial only, our reading)."""
    return check_stride("kv_stride", kv_stride, rank, int_form=(1, 0, 0) if video else None)


class StructViT(nn.Module):
    """StructViT / UniFormer backbone for images (``num_frames=None``) or video.

    Args:
        depths: blocks per stage (4 ints). Stages 1-2 are convolution blocks, 3-4 attention blocks.
        embed_dims: widths per stage (4 ints).
        head_dim: attention head width (heads = width // head_dim in stages 3-4).
        mlp_ratio: MLP hidden width / width.
        qkv_bias: bias in the qkv projections.
        in_chans: input channels.
        num_classes: classifier outputs; 0 for no classifier (``head`` is Identity).
        num_frames: None for an image model (2-D convolutions, input (B, C, H, W));
            an int for a video model (3-D convolutions, input (B, C, T, H, W)); the int is
            the default clip length (any T works at run time).
        struct_blocks: ``"all"`` (default, the paper's): StructSA in every attention block;
            ``(a, b)``: in the last ``a`` blocks of stage 3 and the last ``b`` of stage 4,
            SA in the others; ``(0, 0)``: plain UniFormer.
        attention: kind of the structural blocks: ``"structsa"`` (``num_patterns``
            patterns) or ``"convsa"`` (D = 1).
        window: the pattern detectors' (key) window, odd sizes; (kh, kw) for image models,
            (kt, kh, kw) for video models. Default (3, 3) / (3, 3, 3), the paper's.
        window_v: the aggregators' (value) window, default ``window``.
        num_patterns: D, patterns per head (the paper's models: 4 or 8). Ignored for ConvSA.
        patterns: "channel" (default, the paper's channel-wise StructSA), "head" (the
            dot-product variant) or "shared" (one set for all heads); see
            :class:`structvit.nn.StructSA`.
        kv_stride: key/value stride S of StructViT-X-D-S: keys and values at every S-th
            grid position. An int S means (S, S) for images and (1, S, S) for video (our
            reading: spatial only); or a tuple of the grid's rank.
        normalize: "joint" (one softmax over the D*N scores, the paper's) or "per_pattern".
        pattern_init: "random" (training from scratch) or "sa" (the SA-equivalent start).
        backend: StructSA op backend ("auto", "naive", "correlation", "keyconv", "fused").
        memory_limit: bytes of attention working memory each StructSA layer may hold per
            call (None: the op's default); e.g. ``8 << 20`` for memory-bound CPU training.
        drop_rate: dropout in the MLPs and after the attention projections.
        attn_drop_rate: dropout on attention weights.
        drop_path_rate: stochastic depth, growing linearly with the block index up to this.
        head_drop_rate: dropout before the classifier (the video models use 0.5).
        global_pool: "avg" (mean over the grid) or "" (no pooling; the head acts per position).
        window_size: None (default): every attention block attends over the whole grid; an int
            ws (image models): stage-3 blocks attend within non-overlapping ws x ws windows,
            the map padded bottom/right with zero tokens and cropped back (UniFormer's dense
            backbones, h14 / h32). Stage 4 stays global.
        window_pattern: which stage-3 blocks use windows: "hybrid" (UniFormer's ``hybrid``:
            block i attends globally when (i + 1) % 4 == 0, in windows otherwise) or "all".
        window_conv: how a windowed StructSA sees its window: "window" (the window is the
            grid, zeros beyond its edges; our reading) or "map" (the key/value patterns
            convolve the whole map, then each window attends over its own convolved keys).
        dense: the dense-prediction backbone (image models): a LayerNorm (eps 1e-6) on each
            stage's output, ``norm1``..``norm4`` as in UniFormer's detection / segmentation
            backbones, applied by ``forward_intermediates`` (so ``features_only=True`` gives the
            four normalised maps), and the input padded bottom/right to a multiple of 32, the
            maps cropped back to ceil(H / s) x ceil(W / s) for s = 4, 8, 16, 32 at any input size.
    """

    def __init__(self, depths: Sequence[int] = (3, 4, 8, 3), embed_dims: Sequence[int] = (64, 128, 320, 512),
                 head_dim: int = 64, mlp_ratio: float = 4.0, qkv_bias: bool = True, in_chans: int = 3,
                 num_classes: int = 1000, num_frames: int | None = None, struct_blocks="all",
                 attention: str = "structsa", window: Sequence[int] | None = None,
                 window_v: Sequence[int] | None = None, num_patterns: int = 4, patterns: str = "channel",
                 kv_stride=1, normalize: str = "joint", pattern_init: str = "random", backend: str = "auto",
                 memory_limit: int | None = None, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, head_drop_rate: float = 0.0, global_pool: str = "avg",
                 window_size: int | None = None, window_pattern: str = "hybrid", window_conv: str = "window",
                 dense: bool = False):
        super().__init__()
        depths, embed_dims = tuple(depths), tuple(embed_dims)
        if len(depths) != 4 or not all(isinstance(d, int) and d >= 0 for d in depths):
            raise ValueError(f"depths must be 4 non-negative ints, got {depths!r}")
        if len(embed_dims) != 4 or not all(isinstance(d, int) and d > 0 for d in embed_dims):
            raise ValueError(f"embed_dims must be 4 positive ints, got {embed_dims!r}")
        if not isinstance(head_dim, int) or head_dim <= 0 or any(d % head_dim for d in embed_dims[2:]):
            raise ValueError(f"head_dim must be a positive int dividing the stage 3-4 widths {embed_dims[2:]}, "
                             f"got {head_dim!r}")
        if num_frames is not None and (not is_int(num_frames)
                                       or num_frames < 1):
            raise ValueError(f"num_frames must be None (image model) or a positive int (video model), got {num_frames!r}")
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be a non-negative int, got {num_classes!r}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        video = num_frames is not None
        rank = 3 if video else 2
        if window_size is not None and (not is_int(window_size)
                                        or window_size < 1 or video):
            raise ValueError(f"window_size must be None or a positive int (image models only), got {window_size!r}"
                             + (" for a video model" if video else ""))
        if window_pattern not in WINDOW_PATTERNS:
            raise ValueError(f"window_pattern must be one of {WINDOW_PATTERNS}, got {window_pattern!r}")
        if window_conv not in WINDOW_CONVS:
            raise ValueError(f"window_conv must be one of {WINDOW_CONVS}, got {window_conv!r}")
        if not isinstance(dense, bool) or (dense and video):
            raise ValueError(f"dense must be a bool (True for image models only), got {dense!r}")
        window = _check_window((3,) * rank if window is None else window, rank, video, "window")
        window_v = window if window_v is None else _check_window(window_v, rank, video, "window_v")
        kv_stride = _check_kv_stride(kv_stride, rank, video)
        n_struct = _check_struct_blocks(struct_blocks, depths)

        self.depths, self.embed_dims, self.head_dim = depths, embed_dims, head_dim
        self.num_frames, self.video = num_frames, video
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.global_pool = global_pool
        self.struct_blocks = n_struct
        self.attention = attention
        self.num_patterns = num_patterns if attention == "structsa" else 1
        self.patterns = patterns
        self.window, self.window_v, self.kv_stride = window, window_v, kv_stride
        self.window_size, self.window_pattern, self.window_conv = window_size, window_pattern, window_conv
        self.dense = dense
        self.dense_stride = DENSE_STRIDE
        self.grad_checkpointing = False

        # stochastic depth decay rule, over all blocks
        total = sum(depths)
        dpr = [drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
        self.block_kinds: list[list[str]] = []
        self.feature_info = []
        in_dim = in_chans
        for s, (depth, dim) in enumerate(zip(depths, embed_dims)):
            embed = PatchEmbed(in_dim, dim, 4 if s == 0 else 2, video=video, temporal=3 if s == 0 else 1)
            setattr(self, f"patch_embed{s + 1}", embed)
            if s == 0:
                self.pos_drop = nn.Dropout(drop_rate)
            offset = sum(depths[:s])
            blocks, kinds = [], []
            for i in range(depth):
                if s < 2:
                    kinds.append("conv")
                    blocks.append(ConvBlock(dim, mlp_ratio, drop_rate, dpr[offset + i], video))
                    continue
                heads = dim // head_dim
                if i >= depth - n_struct[s - 2]:
                    kinds.append(attention)
                    attn = StructSA(dim, heads, window=window, num_patterns=self.num_patterns, patterns=patterns,
                                    window_v=window_v, kv_stride=kv_stride, normalize=normalize, qkv_bias=qkv_bias,
                                    attn_drop=attn_drop_rate, proj_drop=drop_rate, init=pattern_init,
                                    backend=backend, memory_limit=memory_limit)
                else:
                    kinds.append("sa")
                    attn = SelfAttention(dim, heads, qkv_bias=qkv_bias, attn_drop=attn_drop_rate, proj_drop=drop_rate)
                windowed = s == 2 and window_size is not None and window_uses(window_pattern, i)
                blocks.append(AttentionBlock(dim, attn, mlp_ratio, drop_rate, dpr[offset + i], video,
                                             window_size if windowed else None, window_conv))
            setattr(self, f"blocks{s + 1}", nn.ModuleList(blocks))
            if dense:  # UniFormer's dense backbones: norm1..norm4 on the stage outputs
                setattr(self, f"norm{s + 1}", nn.LayerNorm(dim, eps=1e-6))
            self.block_kinds.append(kinds)
            self.feature_info.append(dict(num_chs=dim, reduction=2 ** (s + 2), module=f"blocks{s + 1}"))
            in_dim = dim
        self.norm = _bn_cls(video)(embed_dims[-1])
        self.head_drop = nn.Dropout(head_drop_rate)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_weights)

    # ------------------------------------------------------------ timm contract

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Full names of the position encodings and StructSA patterns (exempt from weight decay)."""
        return {name for name, _ in self.named_parameters()
                if ".pos_embed." in name or name.endswith(".attn.u_k") or name.endswith(".attn.u_v")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^patch_embed1", blocks=r"^(?:blocks|patch_embed)(\d+)" if coarse else
                    [(r"^blocks(\d+)\.(\d+)", None), (r"^patch_embed(\d+)", (0,)), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = bool(enable)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be a non-negative int, got {num_classes!r}")
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            init_weights(self.head)

    def stages(self) -> list[tuple[nn.Module, nn.ModuleList]]:
        """The four (patch embedding, blocks) pairs, in order."""
        return [(getattr(self, f"patch_embed{s}"), getattr(self, f"blocks{s}")) for s in range(1, 5)]

    def _run_stage(self, s: int, x: torch.Tensor) -> torch.Tensor:
        embed, blocks = self.stages()[s]
        x = embed(x)
        if s == 0:
            x = self.pos_drop(x)
        for blk in blocks:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def _stages_scripted(self, x: torch.Tensor) -> torch.Tensor:
        """The four stages as TorchScript sees them (no ``getattr`` by name, no checkpointing)."""
        x = self.pos_drop(self.patch_embed1(x))
        for blk in self.blocks1:
            x = blk(x)
        x = self.patch_embed2(x)
        for blk in self.blocks2:
            x = blk(x)
        x = self.patch_embed3(x)
        for blk in self.blocks3:
            x = blk(x)
        x = self.patch_embed4(x)
        for blk in self.blocks4:
            x = blk(x)
        return x

    def set_window_size(self, window_size: int | None) -> None:
        """Switch stage 3's windowed blocks (as ``window_pattern`` places them) to ``window_size``,
        or to global attention with None (e.g. train global at 512 x 512, test with h32 windows)."""
        if window_size is not None and (not is_int(window_size)
                                        or window_size < 1 or self.video):
            raise ValueError(f"window_size must be None or a positive int (image models only), got {window_size!r}")
        for i, blk in enumerate(self.blocks3):
            blk.window_size = window_size if window_uses(self.window_pattern, i) else None
        self.window_size = window_size

    def stage_norm(self, s: int, x: torch.Tensor) -> torch.Tensor:
        """A dense backbone's norm of stage ``s`` (0-based) output (B, C, H, W); identity otherwise."""
        norm = getattr(self, f"norm{s + 1}", None)
        if not self.dense or norm is None:
            return x
        return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, [T,] H, W) -> the normalised last-stage map (B, C4, [T',] H/32, W/32)."""
        _check_input(x, self.video, 1 if self.dense else self.dense_stride)
        if self.dense:
            x = pad_to_multiple(x, self.dense_stride)
        if torch.jit.is_scripting():
            x = self._stages_scripted(x)
        else:
            for s in range(4):
                x = self._run_stage(s, x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.flatten(2).mean(-1)
            x = self.head_drop(x)
            return x if pre_logits else self.head(x)
        x = self.head_drop(x)
        last = x.dim() - 1
        return x if pre_logits else self.head(x.movedim(1, last)).movedim(last, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """The stage maps (B, C_s, [T_s,] H_s, W_s) selected by ``indices`` (timm's API).

        ``norm`` applies the final norm to the last stage's map (it is sized for it only).
        A dense backbone (``dense=True``) pads the input bottom/right to a multiple of 32 and
        returns every map through its stage norm (``norm1``..``norm4``), whatever ``norm`` says,
        cropped to the input's extent: (B, C_s, ceil(H / 2^(s+2)), ceil(W / 2^(s+2))).
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW' (NCTHW for video), got {output_fmt!r}")
        _check_input(x, self.video)
        height, width = x.shape[-2], x.shape[-1]
        if self.dense:
            x = pad_to_multiple(x, self.dense_stride)
        take, max_index = feature_take_indices(4, indices)
        out = []
        last = 3 if not stop_early else max_index
        for s in range(last + 1):
            x = self._run_stage(s, x)
            if s in take:
                if self.dense:  # the map of the input's own extent: ceil(H / stride) x ceil(W / stride)
                    stride = 2 ** (s + 2)
                    out.append(self.stage_norm(s, x)[..., :-(-height // stride), :-(-width // stride)])
                else:
                    out.append(self.norm(x) if norm and s == 3 else x)
        if intermediates_only:
            return out
        if last == 3:
            x = self.norm(x)
        return x, out

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last wanted feature (and the norm/head); returns the kept indices."""
        take, max_index = feature_take_indices(4, indices)
        for s in range(max_index + 2, 5):
            setattr(self, f"patch_embed{s}", nn.Identity())
            setattr(self, f"blocks{s}", nn.ModuleList())
            if self.dense:
                setattr(self, f"norm{s}", nn.Identity())
        if prune_norm or max_index < 3:
            self.norm = nn.Identity()
        if max_index < 3:
            self.num_features = self.head_hidden_size = self.embed_dims[max_index]
        if prune_head or max_index < 3:
            self.reset_classifier(0, "")
        return take

    def extra_repr(self) -> str:
        extra = f"video={self.video}, struct_blocks={self.struct_blocks}, attention={self.attention!r}"
        if any(self.struct_blocks):
            extra += (f", num_patterns={self.num_patterns}, patterns={self.patterns!r}, window={self.window}"
                      + (f", window_v={self.window_v}" if self.window_v != self.window else "")
                      + f", kv_stride={self.kv_stride}")
        if self.window_size is not None:
            extra += f", window_size={self.window_size}, window_pattern={self.window_pattern!r}"
            extra += f", window_conv={self.window_conv!r}" if any(self.struct_blocks) else ""
        if self.dense:
            extra += ", dense=True"
        return extra


# --------------------------------------------------------------------------- configs


@dataclasses.dataclass
class VideoPretrainedCfg(PretrainedCfg):
    """timm's PretrainedCfg with the clip length: ``num_frames`` frames of ``input_size[1:]``.

    ``timm.get_pretrained_cfg_value(name, "num_frames")`` and ``model.pretrained_cfg["num_frames"]``
    read it; timm's data tools read ``input_size`` as (C, H, W) per frame.
    """

    num_frames: Optional[int] = None


def _pool_size(input_size: Sequence[int], num_frames: int | None) -> tuple[int, ...]:
    """The last-stage grid for the default input: H, W / 32 (floored at each of the four
    strided embeddings); T halved once, rounded up, by the video stem."""
    h, w = input_size[1:]
    for stride in (4, 2, 2, 2):
        h, w = h // stride, w // stride
    return (h, w) if num_frames is None else ((num_frames + 1) // 2, h, w)


def _cfg(num_frames: int | None = None, **kwargs):
    cfg = dict(url="", num_classes=1000 if num_frames is None else 400, input_size=(3, 224, 224),
               crop_pct=0.9 if num_frames is None else 1.0, interpolation="bicubic",
               mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, first_conv="patch_embed1.proj",
               classifier="head", license="apache-2.0")
    cfg.update(kwargs)
    cfg.setdefault("pool_size", _pool_size(cfg["input_size"], num_frames))
    if num_frames is None:
        return PretrainedCfg(**cfg)
    cfg.setdefault("notes", ("video model: input (B, C, T, H, W), input_size per frame, T = num_frames",))
    return VideoPretrainedCfg(num_frames=num_frames, **cfg)


# size: depths, widths, head dim, default stochastic depth (tiny is ours, for CPU experiments)
_SIZES = {
    "tiny": dict(depths=(1, 1, 2, 1), embed_dims=(32, 64, 128, 256), head_dim=32, drop_path_rate=0.0),
    "s": dict(depths=(3, 4, 8, 3), embed_dims=(64, 128, 320, 512), head_dim=64, drop_path_rate=0.1),
    "b": dict(depths=(5, 8, 20, 7), embed_dims=(64, 128, 320, 512), head_dim=64, drop_path_rate=0.3),
    "l": dict(depths=(5, 10, 24, 7), embed_dims=(128, 192, 448, 640), head_dim=64, drop_path_rate=0.4),
}
_FRAMES = {"tiny": 16, "s": 16, "b": 32, "l": 32}  # default clip length of the video models

# the paper's models: name -> (size, D, S)
PAPER_MODELS = {
    "structvit_s_4_2": ("s", 4, 2), "structvit_s_4_1": ("s", 4, 1), "structvit_s_8_1": ("s", 8, 1),
    "structvit_b_4_2": ("b", 4, 2), "structvit_b_4_1": ("b", 4, 1), "structvit_b_8_1": ("b", 8, 1),
    "structvit_l_4_1": ("l", 4, 1),
}

default_cfgs = generate_default_cfgs({
    "structvit_tiny": _cfg(input_size=(3, 112, 112)),
    "structvit_tiny_video": _cfg(num_frames=_FRAMES["tiny"], input_size=(3, 112, 112)),
    **{name: _cfg() for name in PAPER_MODELS},
    **{name + "_video": _cfg(num_frames=_FRAMES[size]) for name, (size, _, _) in PAPER_MODELS.items()},
})


def _create(variant: str, pretrained: bool = False, **kwargs) -> StructViT:
    size, num_patterns, kv_stride = PAPER_MODELS.get(variant.removesuffix("_video"), ("tiny", 4, 1))
    video = variant.endswith("_video")
    args = dict(_SIZES[size], num_patterns=num_patterns, kv_stride=kv_stride)
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    if video:
        args.update(num_frames=_FRAMES[size], head_drop_rate=0.5)
    elif kwargs.get("num_frames") is not None:
        raise ValueError(f"num_frames is for the video models ({variant}_video); {variant} is an image model")
    args.update(kwargs)
    if video and args["num_frames"] is None:
        raise ValueError(f"num_frames must be a positive int for the video model {variant}, got None "
                         f"(the image model is {variant.removesuffix('_video')})")
    if video and args["num_frames"] != _FRAMES[size] and isinstance(args["num_frames"], int):
        cfg = default_cfgs[variant].default
        overlay.setdefault("num_frames", args["num_frames"])
        overlay.setdefault("pool_size", _pool_size(overlay.get("input_size", cfg.input_size), args["num_frames"]))
    return build_model_with_cfg(StructViT, variant, pretrained, pretrained_cfg_overlay=overlay or None,
                                feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)), **args)


@register_model
def structvit_tiny(pretrained: bool = False, **kwargs) -> StructViT:
    """StructViT-tiny-4-1 (ours, for CPU): depths 1-1-2-1, widths 32-64-128-256, head dim 32."""
    return _create("structvit_tiny", pretrained, **kwargs)


@register_model
def structvit_tiny_video(pretrained: bool = False, **kwargs) -> StructViT:
    """Video StructViT-tiny-4-1 (3-D convolutions, 3x3x3 windows), 16 frames by default."""
    return _create("structvit_tiny_video", pretrained, **kwargs)


@register_model
def structvit_s_4_2(pretrained: bool = False, **kwargs) -> StructViT:
    """StructViT-S-4-2: UniFormer-S layout, D = 4, key/value stride 2."""
    return _create("structvit_s_4_2", pretrained, **kwargs)


@register_model
def structvit_s_4_1(pretrained: bool = False, **kwargs) -> StructViT:
    """StructViT-S-4-1: UniFormer-S layout, D = 4, stride 1."""
    return _create("structvit_s_4_1", pretrained, **kwargs)


@register_model
def structvit_s_8_1(pretrained: bool = False, **kwargs) -> StructViT:
    """StructViT-S-8-1: UniFormer-S layout, D = 8, stride 1."""
    return _create("structvit_s_8_1", pretrained, **kwargs)


@register_model
def structvit_b_4_2(pretrained: bool = False, **kwargs) -> StructViT:
    """StructViT-B-4-2: UniFormer-B layout, D = 4, key/value stride 2."""
    return _create("structvit_b_4_2", pretrained, **kwargs)


@register_model
def structvit_b_4_1(pretrained: bool = False, **kwargs) -> StructViT:
    """StructViT-B-4-1: UniFormer-B layout, D = 4, stride 1."""
    return _create("structvit_b_4_1", pretrained, **kwargs)


@register_model
def structvit_b_8_1(pretrained: bool = False, **kwargs) -> StructViT:
    """StructViT-B-8-1: UniFormer-B layout, D = 8, stride 1."""
    return _create("structvit_b_8_1", pretrained, **kwargs)


@register_model
def structvit_l_4_1(pretrained: bool = False, **kwargs) -> StructViT:
    """StructViT-L-4-1: UniFormer-L layout (depths 5-10-24-7, widths 128-192-448-640), D = 4, stride 1."""
    return _create("structvit_l_4_1", pretrained, **kwargs)


@register_model
def structvit_s_4_2_video(pretrained: bool = False, **kwargs) -> StructViT:
    """Video StructViT-S-4-2: 16 frames, D = 4, key/value stride (1, 2, 2)."""
    return _create("structvit_s_4_2_video", pretrained, **kwargs)


@register_model
def structvit_s_4_1_video(pretrained: bool = False, **kwargs) -> StructViT:
    """Video StructViT-S-4-1: 16 frames, D = 4, stride 1."""
    return _create("structvit_s_4_1_video", pretrained, **kwargs)


@register_model
def structvit_s_8_1_video(pretrained: bool = False, **kwargs) -> StructViT:
    """Video StructViT-S-8-1: 16 frames, D = 8, stride 1."""
    return _create("structvit_s_8_1_video", pretrained, **kwargs)


@register_model
def structvit_b_4_2_video(pretrained: bool = False, **kwargs) -> StructViT:
    """Video StructViT-B-4-2: 32 frames, D = 4, key/value stride (1, 2, 2)."""
    return _create("structvit_b_4_2_video", pretrained, **kwargs)


@register_model
def structvit_b_4_1_video(pretrained: bool = False, **kwargs) -> StructViT:
    """Video StructViT-B-4-1, the paper's main video model: 32 frames, D = 4, stride 1."""
    return _create("structvit_b_4_1_video", pretrained, **kwargs)


@register_model
def structvit_b_8_1_video(pretrained: bool = False, **kwargs) -> StructViT:
    """Video StructViT-B-8-1: 32 frames, D = 8, stride 1."""
    return _create("structvit_b_8_1_video", pretrained, **kwargs)


@register_model
def structvit_l_4_1_video(pretrained: bool = False, **kwargs) -> StructViT:
    """Video StructViT-L-4-1: 32 frames, D = 4, stride 1."""
    return _create("structvit_l_4_1_video", pretrained, **kwargs)
