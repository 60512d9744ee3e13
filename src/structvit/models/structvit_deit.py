"""The paper's ablation backbone: a DeiT-style ViT with every attention replaced by StructSA.

Sec. 4.2: "For a direct comparison with SA, we choose to use DeiT-S as the baseline
backbone ... we replace all the SA layers in DeiT with StructSA layers", with D = 4,
3x3 (3x3x3 for video) windows, context aggregation and channel-wise patterns by default.
``attention="sa"`` is the plain DeiT baseline, ``"convsa"`` ConvSA (D = 1).

One implementation serves images and video. An image model (``num_frames=None``) cuts
16x16 patches of a (B, C, H, W) image; a video model cuts ``tubelet_size`` x 16 x 16
tubelets of a (B, C, T, H, W) clip (our reading: the paper does not say how its DeiT sees
video; 2-frame tubelets keep a 16-frame clip at 8 x 14 x 14 tokens). The tokens keep
their grid, (H', W') or (T', H', W'), which every StructSA layer needs.

Structure (DeiT / timm's ``VisionTransformer``): patch embedding, learned absolute
position embedding, ``depth`` pre-norm blocks (LayerNorm, attention, residual;
LayerNorm, MLP with ratio 4, residual), LayerNorm, pooling, linear head. Parameter names
are timm's (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.{i}.norm1``,
``blocks.{i}.attn.qkv``, ``blocks.{i}.attn.proj``, ``blocks.{i}.norm2``,
``blocks.{i}.mlp.fc1``, ``blocks.{i}.mlp.fc2``, ``norm``, ``head``), so a DeiT checkpoint
loads (see :func:`structvit.convert.load_deit`); StructSA adds ``attn.u_k`` and
``attn.u_v``. Video models add ``time_embed`` (1, T', dim), a learned embedding per
tubelet index added to the spatial ``pos_embed`` (our reading, TimeSformer's separable
form, so an image model's ``pos_embed`` carries over unchanged).

The class token (our reading; the paper does not say how it takes part):

- ``class_token=False`` (default): no class token; the head sees the average of the
  patch tokens. Every attention layer sees exactly the token grid.
- ``class_token=True``: a class token (DeiT's) whose query attends to all tokens
  [cls; patches] with plain SA weights (same ``qkv`` / ``proj``), while the patch
  tokens run StructSA over the grid only (they do not see the class token). With
  ``attention="sa"`` every token attends to all tokens, as in DeiT.

TorchScript and torch.fx as for StructViT (see :mod:`structvit.models.structvit`): the
models script (the op and the class-token attention run through Python) and trace with
torch.fx with ``DeiTBlock`` a timm notrace leaf.
"""
import math
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, register_notrace_module, trunc_normal_
from timm.models import PretrainedCfg, build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..nn.attention import SelfAttention, StructSA
from ..ops.checks import are_sizes, check_positive_int, is_int
from .structvit import VideoPretrainedCfg, init_weights, token_grid

__all__ = ["StructDeiT", "DeiTBlock", "TokenEmbed", "DEIT_ATTENTION_KINDS", "attend_with_prefix", "default_cfgs"]

DEIT_ATTENTION_KINDS = ("sa", "convsa", "structsa")
GLOBAL_POOLS = ("avg", "token", "")


def _positive_int(name: str, value) -> int:
    return check_positive_int(name, value)


def _pair(name: str, value) -> tuple[int, int]:
    if is_int(value):
        value = (value, value)
    if not are_sizes(value) or len(value) != 2:
        raise ValueError(f"{name} must be a positive int or two positive ints (H, W), got {value!r}")
    return tuple(value)


def attend_with_prefix(attn: nn.Module, x: torch.Tensor, grid: Sequence[int], num_prefix: int) -> torch.Tensor:
    """Attention of ``num_prefix`` leading tokens (the class token) and a token grid.

    x: (B, P + N, dim), the P prefix tokens first, then the N = prod(grid) grid tokens.
    With plain :class:`SelfAttention` every token attends to all P + N tokens (DeiT).
    With :class:`StructSA`, :meth:`StructSA.forward_with_prefix`: the prefix queries attend
    to all P + N keys with ordinary attention, the grid queries run StructSA over the grid
    tokens only. Returns (B, P + N, dim).
    """
    if num_prefix == 0:
        return attn(x, grid)
    if not isinstance(attn, StructSA):
        return attn(x)
    return attn.forward_with_prefix(x, list(grid), num_prefix)


@torch.jit.ignore
def _check_input(x: torch.Tensor, video: bool, img_size: Tuple[int, int], tubelet_size: int) -> None:
    """Python (also under TorchScript), a leaf under torch.fx (``torch.fx.wrap`` below)."""
    want = 5 if video else 4
    if not isinstance(x, torch.Tensor) or x.dim() != want:
        layout = "(B, C, T, H, W)" if video else "(B, C, H, W)"
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{'video' if video else 'image'} model expects input {layout}, got {got}")
    if tuple(x.shape[-2:]) != tuple(img_size):
        raise ValueError(f"input is {tuple(x.shape[-2:])} pixels but the model's position embedding is sized "
                         f"for img_size={tuple(img_size)} (build it with img_size=...)")
    if video and x.shape[2] < tubelet_size:
        raise ValueError(f"a clip needs at least tubelet_size={tubelet_size} frames, got {x.shape[2]}")


def resample_time(time_embed: torch.Tensor, frames: int) -> torch.Tensor:
    """(1, T', dim) -> (1, frames, dim): a temporal embedding, linearly interpolated for
    another clip length (a leaf under torch.fx, where ``frames`` is traced)."""
    if time_embed.shape[1] == frames:
        return time_embed
    return F.interpolate(time_embed.transpose(1, 2), size=frames, mode="linear",
                         align_corners=False).transpose(1, 2)


torch.fx.wrap("_check_input")
torch.fx.wrap("resample_time")
torch.fx.wrap("token_grid")  # fx wraps a name in the module that calls it


class TokenEmbed(nn.Module):
    """Non-overlapping patch (image) or tubelet (video) embedding by one strided convolution.

    Image: (B, C, H, W) -> (B, H/p * W/p, dim) on the grid (H/p, W/p). Video:
    (B, C, T, H, W) -> (B, T/t * H/p * W/p, dim) on the grid (T/t, H/p, W/p), with
    t = ``tubelet_size``. No norm (DeiT).
    """

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, video: bool = False, tubelet_size: int = 1):
        super().__init__()
        k = (tubelet_size, patch_size, patch_size) if video else (patch_size, patch_size)
        self.proj = (nn.Conv3d if video else nn.Conv2d)(in_chans, embed_dim, k, stride=k)
        self.video = video

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
        x = self.proj(x)
        grid = token_grid(x)
        return x.flatten(2).transpose(1, 2), grid


@register_notrace_module  # torch.fx: a leaf (the class-token attention is Python)
class DeiTBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``.

    ``attn`` is SA, ConvSA or StructSA; the block is told the grid and how many prefix
    tokens lead it (see :func:`attend_with_prefix`).
    """

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float = 4.0, drop: float = 0.0,
                 drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = attn
        self.struct = isinstance(attn, StructSA)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    @torch.jit.ignore
    def _attend_with_prefix(self, x: torch.Tensor, grid: List[int], num_prefix: int) -> torch.Tensor:
        # Python also under TorchScript, where ``self.attn`` is the C++ scripted module (not an
        # nn.Module, not callable: its methods are), so ``self.struct`` says its kind
        attn = self.attn
        if self.struct:  # exported, so also a method of the scripted module
            return attn.forward_with_prefix(x, grid, num_prefix)
        return attn(x) if isinstance(attn, nn.Module) else attn.forward(x, None)  # SA over all tokens

    def forward(self, x: torch.Tensor, grid: List[int], num_prefix: int = 0) -> torch.Tensor:
        """x: (B, P + N, dim) on ``grid`` (after the P prefix tokens) -> (B, P + N, dim)."""
        y = self.norm1(x)
        y = self.attn(y, grid) if num_prefix == 0 else self._attend_with_prefix(y, grid, num_prefix)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class StructDeiT(nn.Module):
    """DeiT-style ViT with SA, ConvSA or StructSA in every block, for images or video.

    Args:
        img_size: input height and width (an int or (H, W)); the spatial token grid is
            img_size / patch_size and is fixed by the position embedding.
        patch_size: patch side (DeiT: 16).
        in_chans: input channels.
        num_classes: classifier outputs; 0 for no classifier.
        embed_dim, depth, num_heads: width, number of blocks, heads (DeiT-S: 384, 12, 6).
        mlp_ratio: MLP hidden width / width.
        qkv_bias: bias in the qkv projections.
        num_frames: None for an image model (input (B, C, H, W)); an int for a video model
            (input (B, C, T, H, W)), the clip length the temporal embedding is sized for
            (another T works: the embedding is interpolated linearly over time).
        tubelet_size: frames per video token (our reading: 2).
        class_token: add a class token (see the module docstring); default False.
        global_pool: "avg" (mean of the patch tokens), "token" (the class token; needs
            ``class_token=True``) or "" (no pooling: the head acts per token). Default
            "token" with a class token, "avg" without.
        attention: "structsa" (default), "convsa" (one pattern) or "sa" (plain DeiT).
        window: key window, odd sizes; (kh, kw) for images, (kt, kh, kw) or (kh, kw)
            (per frame) for video. Default 3x3 / 3x3x3 (the paper's).
        window_v: value window, default ``window``; (1, 1) / (1, 1, 1) is the paper's
            element-wise aggregation.
        num_patterns: D (the paper's default 4); ignored for ConvSA and SA.
        patterns: "channel" (the paper's), "head" (dot-product) or "shared".
        kv_stride: key/value stride of the StructSA layers (int or one per window axis).
        normalize: "joint" or "per_pattern" softmax.
        pattern_init: "random" or "sa" (SA-equivalent at stride 1).
        backend, memory_limit: passed to every StructSA layer.
        drop_rate: dropout after the position embedding, in the MLPs, after the attention
            projections and before the head.
        attn_drop_rate: dropout on attention weights.
        drop_path_rate: stochastic depth, growing linearly with the block index up to this.
    """

    def __init__(self, img_size=224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 384, depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, num_frames: int | None = None, tubelet_size: int = 2,
                 class_token: bool = False, global_pool: str | None = None, attention: str = "structsa",
                 window: Sequence[int] | None = None, window_v: Sequence[int] | None = None, num_patterns: int = 4,
                 patterns: str = "channel", kv_stride=1, normalize: str = "joint", pattern_init: str = "random",
                 backend: str = "auto", memory_limit: int | None = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        img_size = _pair("img_size", img_size)
        _positive_int("patch_size", patch_size)
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(f"img_size {img_size} must be divisible by patch_size={patch_size}")
        _positive_int("embed_dim", embed_dim)
        _positive_int("depth", depth)
        if not isinstance(num_heads, int) or num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"num_heads must be a positive int dividing embed_dim={embed_dim}, got {num_heads!r}")
        if not is_int(num_classes) or num_classes < 0:
            raise ValueError(f"num_classes must be a non-negative int, got {num_classes!r}")
        video = num_frames is not None
        if video:
            _positive_int("num_frames", num_frames)
            _positive_int("tubelet_size", tubelet_size)
            if num_frames % tubelet_size:
                raise ValueError(f"num_frames={num_frames} must be divisible by tubelet_size={tubelet_size}")
        if attention not in DEIT_ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {DEIT_ATTENTION_KINDS}, got {attention!r}")
        if not isinstance(class_token, bool):
            raise ValueError(f"class_token must be True or False, got {class_token!r}")
        if global_pool is None:
            global_pool = "token" if class_token else "avg"
        self._check_pool(global_pool, class_token)
        rank = 3 if video else 2
        if window is None:
            window = (3,) * rank
        window = (window, window) if is_int(window) else tuple(window)
        if len(window) != rank and not (video and len(window) == 2):
            want = "a video model takes (kt, kh, kw) or per-frame (kh, kw)" if video else "an image model takes (kh, kw)"
            raise ValueError(f"window must have {rank} sizes ({want}), got {window!r}")

        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.depth, self.num_heads = depth, num_heads
        self.num_classes = num_classes
        self.num_frames, self.video = num_frames, video
        self.tubelet_size = tubelet_size if video else 1
        self.global_pool = global_pool
        self.num_prefix_tokens = 1 if class_token else 0
        self.has_class_token = class_token
        self.attention = attention
        self.window = window
        self.grad_checkpointing = False
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)

        self.patch_embed = TokenEmbed(in_chans, embed_dim, patch_size, video, self.tubelet_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        # the class token has its own position (DeiT's layout: (1, P + H'W', dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + math.prod(self.grid_size), embed_dim))
        if video:
            self.time_embed = nn.Parameter(torch.zeros(1, num_frames // tubelet_size, embed_dim))
        else:
            self.register_parameter("time_embed", None)
        self.pos_drop = nn.Dropout(drop_rate)

        dpr = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        blocks = []
        for i in range(depth):
            if attention == "sa":
                attn = SelfAttention(embed_dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop_rate,
                                     proj_drop=drop_rate)
            else:
                attn = StructSA(embed_dim, num_heads, window=window, num_patterns=num_patterns if attention == "structsa" else 1,
                                patterns=patterns, window_v=window_v, kv_stride=kv_stride, normalize=normalize,
                                qkv_bias=qkv_bias, attn_drop=attn_drop_rate, proj_drop=drop_rate, init=pattern_init,
                                backend=backend, memory_limit=memory_limit)
            blocks.append(DeiTBlock(embed_dim, attn, mlp_ratio, drop_rate, dpr[i]))
        self.blocks = nn.ModuleList(blocks)
        self.block_kinds = [attention] * depth
        # what the summary tables read: D (0 for SA) and the StructSA key/value stride
        self.num_patterns = 0 if attention == "sa" else blocks[0].attn.num_patterns
        self.kv_stride = None if attention == "sa" else blocks[0].attn.kv_stride
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}") for i in range(depth)]

        trunc_normal_(self.pos_embed, std=0.02)
        if self.time_embed is not None:
            trunc_normal_(self.time_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(init_weights)

    @staticmethod
    def _check_pool(global_pool: str, class_token: bool) -> None:
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True (the model has no class token)")

    # ------------------------------------------------------------ timm contract

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Position/time embeddings, the class token and the StructSA patterns."""
        names = {n for n in ("pos_embed", "time_embed", "cls_token") if getattr(self, n) is not None}
        return names | {n for n, _ in self.named_parameters() if n.endswith(".attn.u_k") or n.endswith(".attn.u_v")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|^pos_embed|^time_embed|^patch_embed",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = bool(enable)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if not is_int(num_classes) or num_classes < 0:
            raise ValueError(f"num_classes must be a non-negative int, got {num_classes!r}")
        if global_pool is not None:
            self._check_pool(global_pool, self.has_class_token)
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            init_weights(self.head)

    # ------------------------------------------------------------ forward

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
        """Input -> tokens (B, P + N, dim) with position embedding, and the token grid."""
        _check_input(x, self.video, self.img_size, self.tubelet_size)
        x, grid = self.patch_embed(x)
        p = self.num_prefix_tokens
        pos = self.pos_embed[:, p:]
        time_embed = self.time_embed  # None for an image model
        if time_embed is not None:  # spatial position + tubelet index: (1, T' * H'W', dim), time-major like the grid
            pos = (pos.unsqueeze(1) + resample_time(time_embed, grid[0]).unsqueeze(2)).flatten(1, 2)
        x = x + pos
        cls_token = self.cls_token
        if cls_token is not None:
            x = torch.cat([(cls_token + self.pos_embed[:, :p]).expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x), grid

    def _run_block(self, blk: nn.Module, x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(blk, x, grid, self.num_prefix_tokens, use_reentrant=False)
        return blk(x, grid, self.num_prefix_tokens)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, [T,] H, W) -> normalised tokens (B, P + N, dim), the class token first if any."""
        x, grid = self._embed(x)
        for blk in self.blocks:  # inline, not _run_block: TorchScript takes no module arguments
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(blk, x, grid, self.num_prefix_tokens, use_reentrant=False)
            else:
                x = blk(x, grid, self.num_prefix_tokens)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, P + N, dim) -> logits (B, classes) (pooled) or (B, P + N, classes) (no pooling)."""
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(1)
        elif self.global_pool == "token":
            x = x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """Block outputs selected by ``indices`` (timm's API).

        ``output_fmt`` "NCHW": grid tokens as (B, dim, H', W') (images) or
        (B, dim, T', H', W') (video); "NLC": (B, N, dim). ``return_prefix_tokens`` pairs
        each with its class token (B, P, dim).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        x, grid = self._embed(x)
        p = self.num_prefix_tokens
        out = []
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        for i, blk in enumerate(blocks):
            x = self._run_block(blk, x, grid)
            if i in take:
                y = self.norm(x) if norm else x
                tokens = y[:, p:]
                if output_fmt == "NCHW":
                    tokens = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)
                out.append((tokens, y[:, :p]) if return_prefix_tokens and p else tokens)
        if intermediates_only:
            return out
        return self.norm(x), out

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last wanted one (and the norm/head); returns the kept indices."""
        take, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        self.block_kinds = self.block_kinds[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def extra_repr(self) -> str:
        return (f"video={self.video}, attention={self.attention!r}, window={self.window}, "
                f"class_token={self.has_class_token}, global_pool={self.global_pool!r}")


# --------------------------------------------------------------------------- configs


def _cfg(num_frames: int | None = None, **kwargs) -> PretrainedCfg:
    # timm's data tools read input_size as (C, H, W); a video model's clip length is num_frames.
    # fixed_input_size: the position embedding fixes H and W (as timm's DeiT / ViT cfgs say)
    cfg = dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=None, fixed_input_size=True,
               crop_pct=0.875 if num_frames is None else 1.0, interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN,
               std=IMAGENET_DEFAULT_STD, first_conv="patch_embed.proj", classifier="head", license="apache-2.0")
    cfg.update(kwargs)
    if num_frames is None:
        return PretrainedCfg(**cfg)
    cfg.setdefault("notes", ("video model: input (B, C, T, H, W), input_size per frame, T = num_frames",))
    return VideoPretrainedCfg(num_frames=num_frames, **cfg)


# DeiT-S (Touvron et al.), and a tiny one of ours for CPU studies on the built-in 32x32 data:
# 4 blocks of width 96 with 3 heads of 32, patches 4x4 -> an 8x8 grid (as DeiT-S's 14x14 at 224)
_SIZES = {
    "small": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "tiny": dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3),
}
_FRAMES = {"small": 16, "tiny": 8}  # the paper's 16 for SSv1; 8 for the built-in moving digits

default_cfgs = generate_default_cfgs({
    "structvit_deit_small": _cfg(),
    "structvit_deit_tiny": _cfg(input_size=(3, 32, 32), crop_pct=1.0),
    # SSv1 (174 classes): the paper's video ablation on this backbone
    "structvit_deit_small_video": _cfg(_FRAMES["small"], num_classes=174),
    "structvit_deit_tiny_video": _cfg(_FRAMES["tiny"], input_size=(3, 32, 32)),
})


def _create(variant: str, pretrained: bool = False, **kwargs) -> StructDeiT:
    size = variant.removeprefix("structvit_deit_").removesuffix("_video")
    video = variant.endswith("_video")
    args = dict(_SIZES[size])
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    if video:
        args["num_frames"] = _FRAMES[size]
    elif kwargs.get("num_frames") is not None:
        raise ValueError(f"num_frames is for the video models ({variant}_video); {variant} is an image model")
    args.update(kwargs)
    if video and args["num_frames"] is None:
        raise ValueError(f"num_frames must be a positive int for the video model {variant}, got None "
                         f"(the image model is {variant.removesuffix('_video')})")
    if video and args["num_frames"] != _FRAMES[size]:
        overlay.setdefault("num_frames", args["num_frames"])
    img = _pair("img_size", args["img_size"])
    if img != tuple(default_cfgs[variant].default.input_size[1:]):
        overlay.setdefault("input_size", (args.get("in_chans", 3),) + img)
    # features_only as timm's ViTs: every block is a level (feature_info), the last 3 by
    # default, taken by forward_intermediates
    out_indices = args.pop("out_indices", 3)
    return build_model_with_cfg(StructDeiT, variant, pretrained, pretrained_cfg_overlay=overlay or None,
                                feature_cfg=dict(feature_cls="getter", out_indices=out_indices), **args)


@register_model
def structvit_deit_small(pretrained: bool = False, **kwargs) -> StructDeiT:
    """DeiT-S with StructSA in every block (the paper's ablation backbone): 12 blocks, width 384,
    6 heads, 16x16 patches at 224x224; D = 4, 3x3 windows, channel-wise."""
    return _create("structvit_deit_small", pretrained, **kwargs)


@register_model
def structvit_deit_tiny(pretrained: bool = False, **kwargs) -> StructDeiT:
    """A tiny StructSA DeiT for CPU studies: 4 blocks, width 96, 3 heads, 4x4 patches at 32x32."""
    return _create("structvit_deit_tiny", pretrained, **kwargs)


@register_model
def structvit_deit_small_video(pretrained: bool = False, **kwargs) -> StructDeiT:
    """Video DeiT-S with StructSA (3x3x3 windows): 2x16x16 tubelets, 16 frames by default."""
    return _create("structvit_deit_small_video", pretrained, **kwargs)


@register_model
def structvit_deit_tiny_video(pretrained: bool = False, **kwargs) -> StructDeiT:
    """Video version of the tiny model: 2x4x4 tubelets of 8-frame 32x32 clips (a 4x8x8 grid)."""
    return _create("structvit_deit_tiny_video", pretrained, **kwargs)
