"""PatchCore (Roth et al., CVPR 2022)."""

from pipeline.experts.patchcore.expert import PatchCore, PatchCoreConfig

__all__ = ["PatchCore", "PatchCoreConfig"]
