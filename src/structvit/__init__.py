"""StructViT: structural self-attention (StructSA) and StructViT backbones."""
from . import nn, ops
from .ops import struct_attention

__version__ = "0.1.0"
__all__ = ["nn", "ops", "struct_attention", "__version__"]
