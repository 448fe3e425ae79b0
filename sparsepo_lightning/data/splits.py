"""Small steps of the data modules' ``setup``: the seeded validation hold-out, the pad id, the report log."""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from sparsepo_lightning.data.rows import DataReport
from sparsepo_lightning.errors import ConfigError

_Item = TypeVar("_Item")


def tokenizer_pad_id(tokenizer: Any) -> int:
    """The pad id, falling back to EOS (with one warning) like TRL."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has neither a pad nor an eos token. Fix: set tokenizer.pad_token.")
    rank_zero_warn("The tokenizer has no pad token; padding with the EOS id (masked out by attention_mask).")
    return tokenizer.eos_token_id


def hold_out(items: list[_Item], fraction: float, seed: int) -> tuple[list[_Item], list[_Item]]:
    """Seeded split into ``(train, val)`` with ``max(1, round(fraction * n))`` validation items (pairs or
    unpaired examples)."""
    n_val = max(1, round(fraction * len(items)))
    if n_val >= len(items):
        raise ConfigError(
            f"data.val_fraction={fraction} leaves no training pair out of {len(items)}. Fix: lower val_fraction "
            "or provide val_file."
        )
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    val_idx = set(order[:n_val])
    train = [p for i, p in enumerate(items) if i not in val_idx]
    val = [p for i, p in enumerate(items) if i in val_idx]
    return train, val


def log_report(split: str, report: DataReport) -> None:
    """Log a split's data report: a warning when rows were skipped, else an info line."""
    if report.rows_rejected:
        rows = "row" if report.rows_rejected == 1 else "rows"
        rank_zero_warn(f"data ({split}): skipped {report.rows_rejected} bad {rows}.\n{report.summary()}")
    else:
        rank_zero_info(f"data ({split}): {report.summary()}")
