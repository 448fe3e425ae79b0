"""sparsepo-lightning: token-level preference optimisation (SparsePO, TDPO, DPO, ...) with PyTorch Lightning.

Public API: the pure losses (``sparsepo_lightning.losses``), the per-token statistics
(``sparsepo_lightning.logprobs``), the typed containers below, objectives, maskers and the Lightning parts.

The names below are imported on first use (PEP 562), so that importing the package — as ``sparsepo --help`` does —
does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LOSSES = ("bco_loss", "dpo_loss", "dpop_loss", "ipo_loss", "masked_simpo_loss", "pair_sums", "simpo_loss",
           "sparsepo_loss", "split_pairs", "tdpo1_loss", "tdpo2_loss", "weighted_dpo_loss")
_TYPES = ("IGNORE_INDEX", "LossOutput", "PreferenceBatch", "TokenMasks", "TokenStats")
_HOME = {**dict.fromkeys(_LOSSES, "sparsepo_lightning.losses"), **dict.fromkeys(_TYPES, "sparsepo_lightning.types")}

__all__ = [  # noqa: RUF022 (types first, then the losses)
    "IGNORE_INDEX", "LossOutput", "PreferenceBatch", "TokenMasks", "TokenStats",
    "bco_loss", "dpo_loss", "dpop_loss", "ipo_loss", "masked_simpo_loss", "pair_sums", "simpo_loss", "sparsepo_loss",
    "split_pairs", "tdpo1_loss", "tdpo2_loss", "weighted_dpo_loss",
]

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
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


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sparsepo_lightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
