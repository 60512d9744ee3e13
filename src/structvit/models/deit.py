"""The DeiT-style ablation backbone under its earlier module name.

The models live in :mod:`structvit.models.structvit_deit` (timm files a family under its
module's name, and ``deit`` is timm's own DeiT); this module re-exports its public names
so that ``from structvit.models.deit import StructDeiT`` keeps working.
"""
from .structvit_deit import (DEIT_ATTENTION_KINDS, DeiTBlock, StructDeiT, TokenEmbed, attend_with_prefix,
                             default_cfgs)

__all__ = ["StructDeiT", "DeiTBlock", "TokenEmbed", "DEIT_ATTENTION_KINDS", "attend_with_prefix", "default_cfgs"]
