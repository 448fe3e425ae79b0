"""Token maskers: uniform (TDPO1), activation-based (MaPO), learned (SparsePO common / independent) and random
(the credit-granularity control)."""

from sparsepo_lightning.masks.activation import ActivationMasker
from sparsepo_lightning.masks.base import ReferenceOutputs, TokenMasker, UniformMasker
from sparsepo_lightning.masks.learned import LearnedMasker, MaskNetwork
from sparsepo_lightning.masks.random import RandomMasker

__all__ = [
    "ActivationMasker", "LearnedMasker", "MaskNetwork", "RandomMasker", "ReferenceOutputs", "TokenMasker",
    "UniformMasker",
]
