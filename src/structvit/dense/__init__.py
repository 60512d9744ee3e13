"""Dense prediction on the StructViT backbones (the paper's Appendix C).

- :func:`build_fpn_backbone`: a StructViT (``*_h14`` / ``*_h32`` or any registered name) with
  its four normalised stage maps into torchvision's FPN (256 channels);
- :func:`build_mask_rcnn`: torchvision's Mask R-CNN over that backbone (COCO, Table 8);
- :func:`build_semantic_fpn`: Semantic FPN over it (ADE20K, Table 9).

Training and evaluation are :class:`structvit.engine.detection.DetectionModule` and
:class:`structvit.engine.segmentation.SegmentationModule`; the data readers are
:mod:`structvit.data.coco` and :mod:`structvit.data.ade20k`.
"""
from .backbone import FPNBackbone, build_fpn_backbone, load_classification_weights
from .mask_rcnn import build_mask_rcnn
from .semantic_fpn import SemanticFPN, SemanticFPNHead, build_semantic_fpn

__all__ = ["FPNBackbone", "build_fpn_backbone", "load_classification_weights", "build_mask_rcnn",
           "SemanticFPN", "SemanticFPNHead", "build_semantic_fpn"]
