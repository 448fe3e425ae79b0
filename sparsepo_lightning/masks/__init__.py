"""Token maskers: uniform (TDPO1), activation-based (MaPO), learned (SparsePO common / independent, optionally at a
target sparsity), random at a fixed rate, and the controls that wrap any masker to remove its choice of tokens."""

from sparsepo_lightning.masks.activation import ActivationMasker
from sparsepo_lightning.masks.base import FrozenModelOutputs, ReferenceOutputs, TokenContext, TokenMasker, UniformMasker
from sparsepo_lightning.masks.controls import BernoulliControl, PermutedControl, ResponseMeanControl
from sparsepo_lightning.masks.learned import LearnedMasker, MaskNetwork
from sparsepo_lightning.masks.random import RandomMasker

__all__ = [
    "ActivationMasker", "BernoulliControl", "FrozenModelOutputs", "LearnedMasker", "MaskNetwork", "PermutedControl",
    "RandomMasker", "ReferenceOutputs", "ResponseMeanControl", "TokenContext", "TokenMasker", "UniformMasker",
]
