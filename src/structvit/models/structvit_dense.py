"""The paper's dense-prediction backbones (Appendix C, Tables 8 and 9), registered with timm.

"Hourglass" UniFormer-{S, B} h14 (Mask R-CNN, COCO) and h32 (Semantic FPN, ADE20K) with every
attention block StructSA (D = 4, stride 1): stage 3 in UniFormer's hybrid pattern (block i
attends globally when (i + 1) % 4 == 0, within 14 x 14 or 32 x 32 windows otherwise), stage 4
global, a LayerNorm on each stage output (``norm1``..``norm4``, UniFormer's names) and the input
padded to a multiple of 32 (``dense=True``):

- ``structvit_s_4_1_h14``, ``structvit_b_4_1_h14``, ``structvit_s_4_1_h32``, ``structvit_b_4_1_h32``;
- the UniFormer baselines are the same names with ``struct_blocks=(0, 0)``.

``timm.create_model(name, features_only=True)`` gives the four normalised maps (B, C_s,
ceil(H / 2^(s+2)), ceil(W / 2^(s+2))) for s = 0..3 (channels 64, 128, 320, 512); the plain
model keeps the classifier (``norm``, ``head``) so ImageNet weights load unchanged, with only
``norm1``..``norm4`` new (:func:`structvit.dense.backbone.load_classification_weights`).
"""
from timm.models import generate_default_cfgs, register_model

from .structvit import _SIZES, StructViT, _cfg, build_model_with_cfg

__all__ = ["DENSE_MODELS", "dense_default_cfgs"]

# the paper's dense backbones: name -> (size, D, S, window size)
DENSE_MODELS = {
    "structvit_s_4_1_h14": ("s", 4, 1, 14), "structvit_b_4_1_h14": ("b", 4, 1, 14),
    "structvit_s_4_1_h32": ("s", 4, 1, 32), "structvit_b_4_1_h32": ("b", 4, 1, 32),
}

# default inputs: the detector's 800 x 1344 (1333 padded to 32) for h14, the 512 x 512 crop for h32
default_cfgs = generate_default_cfgs({
    name: _cfg(input_size=(3, 800, 1344) if window == 14 else (3, 512, 512))
    for name, (_, _, _, window) in DENSE_MODELS.items()
})
dense_default_cfgs = default_cfgs


def _create_dense(variant: str, pretrained: bool = False, **kwargs) -> StructViT:
    size, num_patterns, kv_stride, window_size = DENSE_MODELS[variant]
    args = dict(_SIZES[size], num_patterns=num_patterns, kv_stride=kv_stride, window_size=window_size,
                window_pattern="hybrid", dense=True)
    if kwargs.get("num_frames") is not None:
        raise ValueError(f"num_frames: {variant} is an image backbone (dense prediction), got {kwargs['num_frames']!r}")
    args.update(kwargs)
    return build_model_with_cfg(StructViT, variant, pretrained,
                                feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)), **args)


@register_model
def structvit_s_4_1_h14(pretrained: bool = False, **kwargs) -> StructViT:
    """StructViT-S-4-1 h14 (Mask R-CNN backbone): stage 3 hybrid with 14 x 14 windows, stage norms."""
    return _create_dense("structvit_s_4_1_h14", pretrained, **kwargs)


@register_model
def structvit_b_4_1_h14(pretrained: bool = False, **kwargs) -> StructViT:
    """StructViT-B-4-1 h14 (Mask R-CNN backbone): stage 3 hybrid with 14 x 14 windows, stage norms."""
    return _create_dense("structvit_b_4_1_h14", pretrained, **kwargs)


@register_model
def structvit_s_4_1_h32(pretrained: bool = False, **kwargs) -> StructViT:
    """StructViT-S-4-1 h32 (Semantic FPN backbone): stage 3 hybrid with 32 x 32 windows, stage norms."""
    return _create_dense("structvit_s_4_1_h32", pretrained, **kwargs)


@register_model
def structvit_b_4_1_h32(pretrained: bool = False, **kwargs) -> StructViT:
    """StructViT-B-4-1 h32 (Semantic FPN backbone): stage 3 hybrid with 32 x 32 windows, stage norms."""
    return _create_dense("structvit_b_4_1_h32", pretrained, **kwargs)
