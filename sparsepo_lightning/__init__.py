"""sparsepo-lightning: token-level preference optimisation (SparsePO, TDPO, DPO, ...) with PyTorch Lightning.

Public API: the pure losses (``sparsepo_lightning.losses``), the per-token statistics
(``sparsepo_lightning.logprobs``), the typed containers below, objectives, maskers and the Lightning parts.
"""

from sparsepo_lightning.losses import (
    bco_loss,
    dpo_loss,
    dpop_loss,
    ipo_loss,
    masked_simpo_loss,
    pair_sums,
    simpo_loss,
    sparsepo_loss,
    split_pairs,
    tdpo1_loss,
    tdpo2_loss,
    weighted_dpo_loss,
)
from sparsepo_lightning.types import IGNORE_INDEX, LossOutput, PreferenceBatch, TokenMasks, TokenStats

__all__ = [
    "IGNORE_INDEX",
    "LossOutput",
    "PreferenceBatch",
    "TokenMasks",
    "TokenStats",
    "bco_loss",
    "dpo_loss",
    "dpop_loss",
    "ipo_loss",
    "masked_simpo_loss",
    "pair_sums",
    "simpo_loss",
    "sparsepo_loss",
    "split_pairs",
    "tdpo1_loss",
    "tdpo2_loss",
    "weighted_dpo_loss",
]
