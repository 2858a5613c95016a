"""PANDA: Adapting Pretrained Features for Anomaly Detection and Segmentation (Reiss et al., CVPR 2021)."""

from pipeline.experts.panda.expert import PANDA, PANDAConfig

__all__ = ["PANDA", "PANDAConfig"]
