"""StructViT: structural self-attention (StructSA) and StructViT backbones."""
from . import models, nn, ops
from .ops import struct_attention

__version__ = "0.1.0"
__all__ = ["models", "nn", "ops", "struct_attention", "__version__"]
