"""Preference data: read + validate rows, tokenise pairs, pad them into (2B, T) batches (or unpaired examples into
(N, T) batches with labels, for BCO)."""

from sparsepo_lightning.data.collate import collate_examples, collate_pairs
from sparsepo_lightning.data.datamodule import PreferenceDataModule
from sparsepo_lightning.data.rows import DataReport, PreferencePair, RawRow, Rejection, UnpairedExample
from sparsepo_lightning.data.tokenize import tokenize_example, tokenize_pair
from sparsepo_lightning.data.unpaired import UnpairedDataModule
from sparsepo_lightning.data.validate import load_examples, load_pairs

__all__ = [
    "DataReport",
    "PreferenceDataModule",
    "PreferencePair",
    "RawRow",
    "Rejection",
    "UnpairedDataModule",
    "UnpairedExample",
    "collate_examples",
    "collate_pairs",
    "load_examples",
    "load_pairs",
    "tokenize_example",
    "tokenize_pair",
]
