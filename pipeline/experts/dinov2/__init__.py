"""AnomalyDINO (Damm et al., 2024): nearest-neighbour anomaly detection on DINOv2 patch tokens, with
optional PCA foreground masking."""

from pipeline.experts.dinov2.expert import DINOv2Patch, DINOv2PatchConfig

__all__ = ["DINOv2Patch", "DINOv2PatchConfig"]
