"""Preference data: read + validate rows, tokenise pairs, pad them into (2B, T) batches."""

from sparsepo_lightning.data.collate import collate_pairs
from sparsepo_lightning.data.module import PreferenceDataModule
from sparsepo_lightning.data.rows import DataReport, PreferencePair, RawRow, Rejection
from sparsepo_lightning.data.tokenize import tokenize_pair
from sparsepo_lightning.data.validate import load_pairs

__all__ = [
    "DataReport",
    "PreferenceDataModule",
    "PreferencePair",
    "RawRow",
    "Rejection",
    "collate_pairs",
    "load_pairs",
    "tokenize_pair",
]
