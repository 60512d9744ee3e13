"""Modules: attention layers over a token grid."""
from .attention import INITS, ConvSA, SelfAttention, StructSA

__all__ = ["SelfAttention", "StructSA", "ConvSA", "INITS"]
