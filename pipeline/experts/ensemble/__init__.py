"""An ensemble of experts fitted at one input spec: their outputs, each in units of its spread on normal
frames, averaged."""

from pipeline.experts.ensemble.expert import Ensemble, EnsembleConfig, Member

__all__ = ["Ensemble", "EnsembleConfig", "Member"]
