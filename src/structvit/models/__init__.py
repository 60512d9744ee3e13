"""StructViT model family, registered with timm on import (``timm.create_model("structvit_b_4_1")``)."""
from .structvit import (ATTENTION_KINDS, PAPER_MODELS, AttentionBlock, ConvBlock, PatchEmbed, StructViT,
                        VideoPretrainedCfg, default_cfgs)

MODEL_NAMES = tuple(default_cfgs)

__all__ = ["StructViT", "ConvBlock", "AttentionBlock", "PatchEmbed", "ATTENTION_KINDS", "PAPER_MODELS",
           "VideoPretrainedCfg", "default_cfgs", "MODEL_NAMES"]

# the DeiT ablation backbone (structvit_deit_*), registered on import
from .structvit_deit import DEIT_ATTENTION_KINDS, StructDeiT  # noqa: E402
from .structvit_deit import default_cfgs as deit_default_cfgs  # noqa: E402

DEIT_MODEL_NAMES = tuple(deit_default_cfgs)
__all__ += ["StructDeiT", "DEIT_ATTENTION_KINDS", "deit_default_cfgs", "DEIT_MODEL_NAMES"]

from .names import check_model_name, project_model_names  # noqa: E402

__all__ += ["check_model_name", "project_model_names"]

# the dense-prediction backbones (structvit_{s,b}_4_1_h{14,32}), registered on import
from .structvit_dense import DENSE_MODELS  # noqa: E402

__all__ += ["DENSE_MODELS"]
