"""The exact forms of structural self-attention, one module per backend.

Every backend has the same signature and takes canonical, already validated arguments:

- q: (B, h, N, C), k: (B, h, N, C), v: (B, h, N, Cv), all on one device and dtype;
- u_k: (hu, cu, D, kt, kh, kw), u_v: (hu, cv', D, kt', kh', kw'), odd window sizes, with
  hu in (1, h) (shared by the heads, or per head) and cu = C, cv' = Cv for channel-wise
  patterns, cu = cv' = 1 for the dot-product layouts;
- grid: (T, H, W) with T * H * W = N; stride: (st, sh, sw), the key/value stride;
- normalize: "joint" or "per_pattern"; scale: float; dropout_p: float; return_weights;
  memory_limit: bytes or None (used by "fused").

and returns ``(out, weights)``: out (B, h, N, Cv) and, when asked for, the attention
weights (B, h, N, D, N') (``None`` otherwise), N' the number of key/value positions.
Which backend serves which case is in :mod:`..dispatch`; docs/design.md has the forms.
"""
from .correlation import correlation
from .fused import fused
from .keyconv import keyconv, pattern_conv
from .naive import naive

BACKENDS = {"naive": naive, "correlation": correlation, "keyconv": keyconv, "fused": fused}

__all__ = ["BACKENDS", "naive", "correlation", "keyconv", "fused", "pattern_conv"]
