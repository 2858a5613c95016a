"""Segment-Anything structure masks (MobileSAM on CPU) for UCAD's structure-based contrastive learning."""

from pipeline.features.segmentation.cache import MaskCache, cache_key, default_cache_dir
from pipeline.features.segmentation.masker import MaskerConfig, StructureMasker, patch_labels
from pipeline.features.segmentation.sam import build_mobile_sam
from pipeline.features.segmentation.tiny_vit import TinyViTEncoder

__all__ = [
    "MaskCache",
    "MaskerConfig",
    "StructureMasker",
    "TinyViTEncoder",
    "build_mobile_sam",
    "cache_key",
    "default_cache_dir",
    "patch_labels",
]
