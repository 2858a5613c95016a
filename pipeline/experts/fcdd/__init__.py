"""FCDD: Fully Convolutional Data Description (Liznerski et al., ICLR 2021)."""

from pipeline.experts.fcdd.expert import FCDD, FCDDConfig

__all__ = ["FCDD", "FCDDConfig"]
