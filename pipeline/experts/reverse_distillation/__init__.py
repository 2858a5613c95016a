"""Reverse Distillation (Deng & Li, CVPR 2022): a student decoder learns to reconstruct the frozen
backbone's multi-scale features of normal images from a one-class bottleneck embedding."""

from pipeline.experts.reverse_distillation.expert import ReverseDistillation, ReverseDistillationConfig

__all__ = ["ReverseDistillation", "ReverseDistillationConfig"]
