"""Model surgery for the comparison figure: SA / ConvSA / StructSA versions of one model that
share all its other weights."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..nn.attention import SelfAttention, StructSA

@torch.no_grad()
def derive_variants(model: nn.Module, seed: int = 0) -> dict[str, nn.Module]:
    """SA / ConvSA / StructSA versions of one model that share all its other weights.

    Every StructSA layer is replaced, in copies of ``model``, by (a) a SelfAttention with
    the same qkv/proj weights ("SA") and (b) a ConvSA (one pattern) with the same
    qkv/proj, layout, windows and key/value stride whose single pattern is the mean of
    the layer's D patterns (u_k and u_v, per channel for channel-wise patterns), a D = 1
    summary of what the layer learned ("ConvSA"). A ConvSA model keeps its
    pattern and gets the SA copy only. Without separately trained models this is the
    closest like-for-like comparison: same tokens into the first attention block, same
    q and k, only the structural part differs.
    """
    out = {}
    sa = copy.deepcopy(model)
    conv = copy.deepcopy(model)
    has_struct = has_conv = False
    for variant, kind in ((sa, "sa"), (conv, "convsa")):
        for name, m in list(variant.named_modules()):
            if not isinstance(m, StructSA):
                continue
            has_struct |= m.num_patterns > 1
            has_conv |= m.num_patterns == 1
            if kind == "sa":
                new = SelfAttention(m.dim, m.num_heads, qkv_bias=m.qkv.bias is not None)
            elif m.num_patterns > 1:
                new = StructSA(m.dim, m.num_heads, window=m.window, num_patterns=1, patterns=m.patterns,
                               window_v=m.window_v, kv_stride=m.kv_stride, normalize=m.normalize,
                               qkv_bias=m.qkv.bias is not None, backend=m.backend, memory_limit=m.memory_limit)
                pd = m.pattern_dim
                new.u_k.copy_(m.u_k.mean(pd, keepdim=True))
                new.u_v.copy_(m.u_v.mean(pd, keepdim=True) * (m.num_patterns if m.normalize == "per_pattern" else 1))
            else:
                continue
            new.qkv.load_state_dict(m.qkv.state_dict())
            new.proj.load_state_dict(m.proj.state_dict())
            new.to(device=m.qkv.weight.device, dtype=m.qkv.weight.dtype)
            parent_name, _, attr = name.rpartition(".")
            if not name:  # the model is the attention layer itself
                variant = new
            else:
                setattr(variant.get_submodule(parent_name), attr, new)
        if kind == "sa":
            sa = variant
        else:
            conv = variant
    out["SA (same q, k)"] = sa
    if has_struct:
        out["ConvSA (mean pattern)"] = conv
        out["StructSA"] = model
    elif has_conv:
        out["ConvSA"] = model
    return out

