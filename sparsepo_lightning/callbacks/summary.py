"""Run summary: what a run learned, printed at the end of ``fit`` and written to ``<log_dir>/summary.json``.

Part of every run (``PreferenceModule.configure_callbacks``). It records, without any extra computation:

- the masks' initial state: the mask metrics of the first training batch (``masks/mean_reward``, sparsity, max);
- every validation run: global step, ``val/loss``, ``val/rewards/accuracy``, ``val/rewards/margin``,
  ``val/kl/seq_chosen`` and, with masks, ``val/masks/mean_reward`` and the reward-mask sparsity; these are the
  epoch values that the module logs (the same numbers TensorBoard shows); with masks also ``diagnostics``, the
  mask diagnostics of ``masks.diagnostics`` over the whole validation run (all batches and ranks, exact):
  ``{mean_kept,gini,effective_token_ratio,within_cv,between_variance_share}_{reward,kl}_{chosen,rejected}``;
- a sanity check that covers the whole validation set (``trainer.num_sanity_val_steps: -1``) as the row of step
  0, before training: the same metrics averaged over the pairs of its batches (``masks/mean_reward`` is averaged
  per batch, weighted by pairs, instead of per token; under DDP the batches of the rank that prints);
- the final training step and the wall time of ``fit``.

The printed table reads top to bottom as training goes; a newcomer sees at once whether the validation accuracy
and margin rose and whether the masks moved from where they started.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from sparsepo_lightning.callbacks.statistics import WeightedStats
from sparsepo_lightning.masks.diagnostics import between_shares, diagnostic_stats, is_internal

VALIDATION_KEYS = {
    "loss": "val/loss",
    "accuracy": "val/rewards/accuracy",
    "margin": "val/rewards/margin",
    "kl_seq_chosen": "val/kl/seq_chosen",
    "mask_mean": "val/masks/mean_reward",
    "mask_sparsity_chosen": "val/masks/sparsity_reward_chosen",
    "mask_sparsity_rejected": "val/masks/sparsity_reward_rejected",
}
"""Summary field -> logged metric of a validation run."""

INITIAL_MASK_KEYS = {
    "mask_mean": "masks/mean_reward",
    "mask_max": "masks/max_reward",
    "mask_sparsity_chosen": "masks/sparsity_reward_chosen",
    "mask_sparsity_rejected": "masks/sparsity_reward_rejected",
}
"""Summary field -> metric of the first training batch (the masks as initialised)."""

SUMMARY_FILE = "summary.json"


class RunSummary(Callback):
    """Collect validation results and the masks' start; print a table and write ``summary.json`` after ``fit``."""

    def __init__(self) -> None:
        self.validations: list[dict[str, float]] = []
        self.initial_masks: dict[str, float] | None = None
        self._start = 0.0
        self._sanity: dict[str, Any] = {}
        self._diagnostics = WeightedStats()

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.initial_masks is not None or trainer.global_step > 1:
            return
        record = getattr(pl_module, "last_step", None)
        if record is not None and record.masks is not None and record.stage == "train":
            self.initial_masks = {k: float(record.metrics[m]) for k, m in INITIAL_MASK_KEYS.items()
                                  if m in record.metrics}

    def on_sanity_check_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sanity = {"pairs": 0, "sums": {}}

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        record = getattr(pl_module, "last_step", None)
        if record is not None and record.stage == "val" and record.masks is not None:
            self._diagnostics.update(diagnostic_stats(record.masks, record.stats.response_mask))
        if not trainer.sanity_checking or record is None or not self._sanity:
            return
        pairs = record.out.loss.shape[0]  # pairs (or unpaired examples) the batch's metrics average over
        self._sanity["pairs"] += pairs
        for key, metric in VALIDATION_KEYS.items():
            name = metric.removeprefix("val/")
            if name in record.metrics:
                self._sanity["sums"][key] = self._sanity["sums"].get(key, 0.0) + record.metrics[name].detach() * pairs

    def on_sanity_check_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        sanity, self._sanity = self._sanity, {}
        diagnostics = self._pop_diagnostics()
        whole = list(trainer.num_sanity_val_batches) == list(trainer.num_val_batches)
        if trainer.global_step == 0 and whole and sanity.get("pairs") and not self.validations:
            entry = {"step": 0}
            entry.update({k: float(v) / sanity["pairs"] for k, v in sanity["sums"].items()})
            self.validations.append({**entry, **diagnostics})

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return  # on_sanity_check_end records it
        if trainer.state.fn != "fit":
            self._diagnostics.reset()
            return
        metrics = trainer.callback_metrics
        entry = {"step": trainer.global_step}
        entry.update({k: float(metrics[m]) for k, m in VALIDATION_KEYS.items() if m in metrics})
        self.validations.append({**entry, **self._pop_diagnostics()})

    def _pop_diagnostics(self) -> dict[str, Any]:
        """``{"diagnostics": {name: value}}`` of the validation run just ended (reduced over ranks), or {}."""
        if not self._diagnostics.update_count:
            return {}
        values = self._diagnostics.compute()
        self._diagnostics.reset()
        values.update(between_shares(values, "masks/"))
        return {"diagnostics": {k.removeprefix("masks/"): float(v) for k, v in values.items() if not is_internal(k)}}

    def summary(self, trainer: Trainer) -> dict[str, Any]:
        """Everything recorded, as plain JSON values."""
        return {"global_step": trainer.global_step, "fit_seconds": round(time.perf_counter() - self._start, 1),
                "initial_masks": self.initial_masks, "validations": self.validations}

    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        summary = self.summary(trainer)
        log_dir = trainer.logger.log_dir if trainer.logger is not None else None
        if log_dir:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            (Path(log_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        if self.validations or self.initial_masks:
            rank_zero_info(format_summary(summary, log_dir))

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations, "initial_masks": self.initial_masks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = list(state_dict.get("validations", []))
        self.initial_masks = state_dict.get("initial_masks")


def format_summary(summary: dict[str, Any], log_dir: str | None = None) -> str:
    """The summary as a small text table (validation runs, then the masks at the start and at the end)."""
    lines = ["Run summary" + (f" ({Path(log_dir) / SUMMARY_FILE})" if log_dir else "") + ":"]
    rows = summary["validations"]
    masked = any("mask_mean" in row for row in rows)
    header = f"  {'validation at step':>18}  {'loss':>7}  {'accuracy':>8}  {'margin':>8}"
    header += f"  {'mask mean':>9}  {'mask zeros':>10}" if masked else ""
    lines.append(header if rows else "  no validation ran (data.val_file / val_check_interval: none reached)")
    for row in rows:
        line = (f"  {row['step']:>18}  {row.get('loss', float('nan')):>7.4f}  {row.get('accuracy', float('nan')):>8.3f}"
                f"  {row.get('margin', float('nan')):>8.4f}")
        if masked:
            nan = float("nan")
            zeros = (row.get("mask_sparsity_chosen", nan) + row.get("mask_sparsity_rejected", nan)) / 2
            line += f"  {row.get('mask_mean', float('nan')):>9.4f}  {zeros:>9.1f}%"
        lines.append(line)
    start = summary.get("initial_masks")
    if start:
        zeros = (start["mask_sparsity_chosen"] + start["mask_sparsity_rejected"]) / 2
        lines.append(f"  masks at the start (first training batch): mean {start['mask_mean']:.4f}, "
                     f"{zeros:.1f}% zeros, max {start['mask_max']:.4f}")
    if rows and rows[0]["step"] == 0:
        lines.append("  (step 0 is before training: the policy is the reference, every implicit reward is 0,")
        lines.append("   and accuracy counts strict wins)")
    trained = [row for row in rows if row["step"] > 0]
    if len(trained) >= 2:
        first, last = trained[0], trained[-1]
        lines.append(f"  from step {first['step']} to {last['step']}: accuracy {first['accuracy']:.3f} -> "
                     f"{last['accuracy']:.3f}, margin {first['margin']:.4f} -> {last['margin']:.4f}")
    last = rows[-1].get("diagnostics") if rows else None
    if last:
        mean = {k: (last[f"{k}_reward_chosen"] + last[f"{k}_reward_rejected"]) / 2 for k in (
            "mean_kept", "gini", "effective_token_ratio", "within_cv", "between_variance_share")}
        lines.append(f"  reward mask at step {rows[-1]['step']}: mean kept weight {mean['mean_kept']:.4f}, Gini "
                     f"{mean['gini']:.3f}, effective-token ratio {mean['effective_token_ratio']:.3f},")
        lines.append(f"    within-response CV {mean['within_cv']:.3f}, between-response variance share "
                     f"{mean['between_variance_share']:.3f}")
    lines.append(f"  {summary['global_step']} optimizer step{'' if summary['global_step'] == 1 else 's'}")
    return "\n".join(lines)
