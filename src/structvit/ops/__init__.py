"""Functional ops: structural self-attention and its backends.

Layout: :mod:`.functional` (the API, validated once), :mod:`.dispatch` (which backend
runs: capabilities, memory plan, cost model), :mod:`.backends` (one module per exact
form), :mod:`.native` (building and loading the fused CPU kernel), :mod:`.flops` (FLOP
formulas for the counter), :mod:`.grid` and :mod:`.buffers` (shared pieces).
"""
from . import flops  # noqa: F401  (registers the FLOP formulas)
from .buffers import empty_cache
from .dispatch import BACKEND_NAMES, DEFAULT_MEMORY_LIMIT, choose_backend, estimate_cost
from .functional import (NORMALIZE, PATTERN_LAYOUTS, canonical_grid, canonical_patterns, canonical_stride,
                         resolve_backend, struct_attention, struct_attention_unchecked)

__all__ = ["struct_attention", "struct_attention_unchecked", "choose_backend", "resolve_backend", "estimate_cost",
           "canonical_grid", "canonical_patterns", "canonical_stride", "BACKEND_NAMES", "NORMALIZE",
           "PATTERN_LAYOUTS", "DEFAULT_MEMORY_LIMIT", "empty_cache"]
