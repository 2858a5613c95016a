"""UCAD's expert (Liu et al., AAAI 2024): task prompts learnt by structure-based contrastive learning on
Segment-Anything masks, and knowledge = a coreset of prompted ViT patch features."""

from pipeline.experts.ucad.expert import UCAD, UCADConfig

__all__ = ["UCAD", "UCADConfig"]
