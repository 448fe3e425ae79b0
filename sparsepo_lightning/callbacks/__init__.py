"""Callbacks that observe training (never change the loss): statistics, token heat-maps, generation samples.

Presets composing them live in the top-level ``callbacks/`` folder (``default.yaml``, ``analysis.yaml``), used as a
second config: ``sparsepo fit --config <recipe> --config callbacks/analysis.yaml``.
"""

from sparsepo_lightning.callbacks.generation_samples import GenerationSamples
from sparsepo_lightning.callbacks.heatmaps import TokenHeatmaps
from sparsepo_lightning.callbacks.nonfinite import NonFiniteGuard, NonFiniteTrainingError
from sparsepo_lightning.callbacks.statistics import MaskStatistics, RewardStatistics, WeightedStats
from sparsepo_lightning.callbacks.summary import RunSummary

__all__ = [
    "GenerationSamples", "MaskStatistics", "NonFiniteGuard", "NonFiniteTrainingError", "RewardStatistics",
    "RunSummary", "TokenHeatmaps", "WeightedStats",
]
