"""Functional ops: structural self-attention and its backends."""
from .buffers import empty_cache
from .functional import (BACKEND_NAMES, NORMALIZE, canonical_grid, choose_backend, estimate_cost, resolve_backend,
                         struct_attention)

__all__ = ["struct_attention", "choose_backend", "resolve_backend", "estimate_cost", "canonical_grid",
           "BACKEND_NAMES", "NORMALIZE", "empty_cache"]
