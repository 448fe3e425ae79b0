"""Token maskers: uniform (TDPO1), activation-based (MaPO), learned (SparsePO common / independent) and random
(the credit-granularity control)."""

from sparsepo_lightning.masks.activation import ActivationMasker
from sparsepo_lightning.masks.base import FrozenModelOutputs, ReferenceOutputs, TokenContext, TokenMasker, UniformMasker
from sparsepo_lightning.masks.learned import LearnedMasker, MaskNetwork
from sparsepo_lightning.masks.random import RandomMasker

__all__ = [
    "ActivationMasker", "FrozenModelOutputs", "LearnedMasker", "MaskNetwork", "RandomMasker", "ReferenceOutputs",
    "TokenContext", "TokenMasker", "UniformMasker",
]
