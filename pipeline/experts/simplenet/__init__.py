"""SimpleNet: feature adaptation with a discriminator (Liu et al., CVPR 2023)."""

from pipeline.experts.simplenet.expert import SimpleNet, SimpleNetConfig

__all__ = ["SimpleNet", "SimpleNetConfig"]
