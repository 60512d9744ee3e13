"""StructViT model family, registered with timm on import (``timm.create_model("structvit_small")``)."""
from .structvit import ATTENTION_KINDS, AttentionBlock, ConvBlock, PatchEmbed, StructViT, default_cfgs

MODEL_NAMES = tuple(default_cfgs)

__all__ = ["StructViT", "ConvBlock", "AttentionBlock", "PatchEmbed", "ATTENTION_KINDS", "default_cfgs", "MODEL_NAMES"]
