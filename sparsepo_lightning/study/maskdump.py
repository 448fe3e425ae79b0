"""``MaskDump``: after training, the masks of every validation pair, token by token, as one small JSON file.

Usable in any run (``trainer.callbacks``); the study adds it to every masked run. At the end of each validation run
(sanity checks excluded) it overwrites ``path`` with::

    {"global_step": int, "common": bool,
     "pairs": [{"prompt": str,
                "chosen": {"tokens": [str], "reward": [float], "kl": [float] | null},
                "rejected": {...}}, ...]}

``kl`` is null when the KL mask is the reward mask (a common mask). Values are rounded to 5 significant digits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only

from sparsepo_lightning.callbacks.heatmaps import HeatmapPair, MaskedResponse, pairs_from_record


def _rounded(values: list[float] | None) -> list[float] | None:
    return None if values is None else [float(f"{v:.5g}") for v in values]


def _response(response: MaskedResponse) -> dict[str, Any]:
    return {"tokens": response.tokens, "reward": _rounded(response.reward), "kl": _rounded(response.kl)}


def pair_record(pair: HeatmapPair) -> dict[str, Any]:
    """A heat-map pair as JSON values."""
    return {"prompt": pair.prompt, "chosen": _response(pair.chosen), "rejected": _response(pair.rejected)}


def pair_from_record(row: dict[str, Any]) -> HeatmapPair:
    """The inverse of ``pair_record`` (to render heat-maps from a dump)."""
    def response(r: dict[str, Any]) -> MaskedResponse:
        return MaskedResponse(r["tokens"], r["reward"], r["kl"])

    return HeatmapPair(row["prompt"], response(row["chosen"]), response(row["rejected"]))


class MaskDump(Callback):
    """Write every validation pair's masks to ``path`` at the end of each validation run.

    Args:
        path: the JSON file (its folder is created).
        max_tokens: response tokens kept per response.
    """

    def __init__(self, path: str, max_tokens: int = 256) -> None:
        self.path = Path(path)
        self.max_tokens = max_tokens
        self._pairs: list[dict[str, Any]] = []

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._pairs = []

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        record = getattr(pl_module, "last_step", None)
        if trainer.sanity_checking or record is None or record.masks is None:
            return
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        pairs = pairs_from_record(record, tokenizer, limit=record.batch.num_pairs, max_tokens=self.max_tokens)
        self._pairs += [pair_record(p) for p in pairs]

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not self._pairs:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        common = all(p["chosen"]["kl"] is None for p in self._pairs)
        dump = {"global_step": trainer.global_step, "common": common, "pairs": self._pairs}
        self.path.write_text(json.dumps(dump, ensure_ascii=False) + "\n", encoding="utf-8")
