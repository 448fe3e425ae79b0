"""Token maskers: uniform (TDPO1), activation-based (MaPO) and learned (SparsePO common / independent)."""

from sparsepo_lightning.masks.activation import ActivationMasker
from sparsepo_lightning.masks.base import ReferenceOutputs, TokenMasker, UniformMasker
from sparsepo_lightning.masks.learned import LearnedMasker, MaskNetwork

__all__ = ["ActivationMasker", "LearnedMasker", "MaskNetwork", "ReferenceOutputs", "TokenMasker", "UniformMasker"]
