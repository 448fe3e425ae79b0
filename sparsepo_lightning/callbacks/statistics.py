"""Mask and reward statistics aggregated exactly over an optimizer step (all micro-batches, all ranks).

The module logs ``train/...`` metrics of the *last* micro-batch of each optimizer step (Lightning's on-step
behaviour). These callbacks instead accumulate every micro-batch in torchmetrics states (sums and counts with
``dist_reduce_fx="sum"``, maxima with ``"max"``) and compute, log and reset them once per logging window of
optimizer steps, so a logged value equals the single-batch value on the concatenation of all micro-batches of
all ranks. The metrics themselves are defined once, in :mod:`sparsepo_lightning.metrics` (the module logs the same
definitions per batch). Prefix ``train_step/`` for training, ``val_epoch/`` for a validation run:

- ``MaskStatistics``: ``metrics.mask_stats`` (``masks/sparsity_*``, ``masks/l1_*``, ``masks/max_*``,
  ``masks/mean_*``), the mask diagnostics of ``masks.diagnostics`` (``masks/{mean_kept,gini,effective_token_ratio,
  within_cv,between_variance_share}_{reward,kl}_{chosen,rejected}``), the target of a learned mask with a target
  sparsity (``masks/target_sparsity_{reward,kl}``, %), ``masks/dead_units_{reward,kl}`` (learned masks with ReLU
  units only) and TensorBoard histograms ``masks/{reward,kl}_{chosen,rejected}`` of the mask values over response
  tokens;
- ``RewardStatistics``: ``metrics.loss_stats`` and ``metrics.token_metrics`` (``loss``, ``logit``, ``penalty``,
  ``rewards/*``, ``logps/*``, ``kl/seq_*``, ``kl/token_*``, ``kl/masked_*``); for unpaired examples (BCO)
  ``metrics.unpaired_stats`` instead; and every other scalar metric the objective reports for a batch (a plug-in's
  own, e.g. ``treg/*``, ``rewards/delta``), as the window's mean of its batch values weighted by the batch's pairs.

``sparsepo fit`` adds both (and a step-wise ``LearningRateMonitor``) unless the configured callbacks have them or
``--exact_statistics false``. A quantity one of them logs is then logged to the loggers only under its prefix: the
module keeps its per-batch value for the progress bar, the run summary and monitors (``trainer.callback_metrics``:
``train/loss``, ``val/rewards/accuracy``, ...) but does not write it as a second, near-duplicate series
(:func:`exactly_logged`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torchmetrics import Metric

from sparsepo_lightning.masks.diagnostics import between_shares, diagnostic_stats, is_internal
from sparsepo_lightning.masks.learned import MaskNetwork
from sparsepo_lightning.metrics import Stats, loss_stats, mask_stats, token_metrics, unpaired_stats
from sparsepo_lightning.types import StepRecord

TRAIN_PREFIX = "train_step/"
"""Prefix of values aggregated over the optimizer steps of one logging window."""
VAL_PREFIX = "val_epoch/"
"""Prefix of values aggregated over one whole validation run (all batches, all ranks)."""


class Kind(Enum):
    """How a named statistic is aggregated over a window (and across ranks)."""

    MEAN = "mean"
    """``Σ v·w / Σ w``: states ``sum`` and ``weight``, summed across ranks."""
    MAX = "max"
    """Elementwise maximum: state ``max``, maximum across ranks."""
    SAMPLES = "values"
    """Concatenated samples (histograms): state ``values``, concatenated across ranks."""


class WeightedStats(Metric):
    """Weighted means, maxima and concatenated samples of named statistics, reduced across ranks on ``compute``.

    States are created on the first update that names them (on the device of its values); every rank must
    update the same names, which holds when all ranks run the same configuration.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__(sync_on_compute=True)
        self._kinds: dict[str, Kind] = {}

    def _ensure(self, name: str, kind: Kind, like: Tensor) -> None:
        if name in self._kinds:
            return
        self._kinds[name] = kind
        key = name.replace("/", "__")
        if kind is Kind.MEAN:
            self.add_state(f"{key}__sum", torch.zeros((), device=like.device), dist_reduce_fx="sum")
            self.add_state(f"{key}__weight", torch.zeros((), device=like.device), dist_reduce_fx="sum")
        elif kind is Kind.MAX:
            self.add_state(f"{key}__max", torch.full(like.shape, -torch.inf, device=like.device), dist_reduce_fx="max")
        else:
            self.add_state(f"{key}__values", [], dist_reduce_fx="cat")

    def update(self, stats: Stats) -> None:
        """Add one micro-batch's contributions (no host sync)."""
        for name, (values, weights) in stats.means.items():
            self._ensure(name, Kind.MEAN, values)
            key = name.replace("/", "__")
            setattr(self, f"{key}__sum", getattr(self, f"{key}__sum") + (values.float() * weights).sum())
            setattr(self, f"{key}__weight", getattr(self, f"{key}__weight") + weights.float().sum())
        for name, value in stats.maxima.items():
            self._ensure(name, Kind.MAX, value)
            key = f"{name.replace('/', '__')}__max"
            setattr(self, key, torch.maximum(getattr(self, key), value.float()))
        for name, values in stats.values.items():
            self._ensure(name, Kind.SAMPLES, values)
            getattr(self, f"{name.replace('/', '__')}__values").append(values.detach().float().flatten())

    def sample_names(self) -> set[str]:
        """Names whose value is a concatenation of samples (histograms), not a scalar."""
        return {name for name, kind in self._kinds.items() if kind is Kind.SAMPLES}

    def compute(self) -> dict[str, Tensor]:
        """name -> weighted mean, elementwise max, or the concatenated samples of the window."""
        out = {}
        for name, kind in self._kinds.items():
            key = name.replace("/", "__")
            if kind is Kind.MEAN:
                out[name] = getattr(self, f"{key}__sum") / getattr(self, f"{key}__weight").clamp(min=1e-12)
            elif kind is Kind.MAX:
                out[name] = getattr(self, f"{key}__max")
            else:
                samples = getattr(self, f"{key}__values")
                out[name] = torch.cat(samples) if isinstance(samples, list) else samples  # a tensor after sync
        return out


# ---- dead units of learned masks ----------------------------------------------------------------------------
class UnitActivity:
    """Per-unit maximum pre-activation of the per-layer units of every ``MaskNetwork`` with ReLU units.

    A forward hook on each network's ``layer_act`` (the ReLU after ``w_l·LN(h) + b_l``) records, for each of the L
    units, the max of its pre-activation over the tokens of that call. The mask networks only see response tokens,
    so unit ``l`` is dead on a window when this max is ≤ 0 for every call of the window (ReLU output exactly 0 on
    every response token). Costs one ``amax`` over ``(n, L)`` per call; no extra forward pass.
    """

    def __init__(self, masker: nn.Module | None) -> None:
        self.pending: dict[str, Tensor] = {}
        self._handles = []
        if masker is None:
            return
        for child_name, child in masker.named_modules():  # also inside a control that wraps a learned masker
            if isinstance(child, MaskNetwork) and isinstance(child.layer_act, nn.ReLU):
                name = child_name.rsplit(".", 1)[-1].removesuffix("_net")
                self._handles.append(child.layer_act.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):  # noqa: ANN202 (torch hook signature)
        def record(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            pre = args[0].detach()  # (n, L)
            if pre.numel() == 0:
                return
            unit_max = pre.float().amax(0)  # (L,)
            previous = self.pending.get(name)
            self.pending[name] = unit_max if previous is None else torch.maximum(previous, unit_max)

        return record

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def pop(self) -> dict[str, Tensor]:
        """The per-unit maxima recorded since the last ``pop``, keyed ``masks/unit_max_{reward,kl}``."""
        pending, self.pending = self.pending, {}
        return {f"masks/unit_max_{name}": value for name, value in pending.items()}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def dead_fractions(values: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``masks/unit_max_X`` (L,) -> ``masks/dead_units_X``: fraction of units whose max pre-activation is ≤ 0."""
    prefix = "masks/unit_max_"
    return {f"masks/dead_units_{k.removeprefix(prefix)}": (v <= 0).float().mean()
            for k, v in values.items() if k.startswith(prefix)}


# ---- the callbacks ------------------------------------------------------------------------------------------
def _record(pl_module: LightningModule, stage: str) -> StepRecord | None:
    record = getattr(pl_module, "last_step", None)
    return record if record is not None and record.stage == stage else None


def tensorboard_writers(trainer: Trainer) -> list[Any]:
    """The ``SummaryWriter`` of every TensorBoard logger of the trainer (other loggers are skipped)."""
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def exactly_logged(callbacks: list[Callback]) -> Callable[[str], bool]:
    """Whether a metric (its name without the stage prefix) of the training or validation stage is logged exactly by
    one of ``callbacks`` (the module then leaves its per-batch series out of the loggers)."""
    own = [callback for callback in callbacks if isinstance(callback, _StepStatistics)]
    return lambda name: any(callback.covers(name) for callback in own)


class _StepStatistics(Callback):
    """Shared window logic: accumulate every batch, compute/log/reset at optimizer-step (or validation) ends."""

    def __init__(self, log_every_n_steps: int | None, histogram_every_n_steps: int) -> None:
        super().__init__()
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1 or null (the trainer's), got {log_every_n_steps}.")
        if histogram_every_n_steps < 0:
            raise ValueError(f"histogram_every_n_steps must be >= 0 (0: never), got {histogram_every_n_steps}.")
        self.log_every_n_steps = log_every_n_steps
        self.histogram_every_n_steps = histogram_every_n_steps
        self._train, self._train_hist, self._val = WeightedStats(), WeightedStats(), WeightedStats()
        self._last_global_step = 0

    def _collect(self, record: StepRecord, pl_module: LightningModule, histograms: bool) -> Stats:
        raise NotImplementedError

    def covers(self, name: str) -> bool:
        """Whether this callback logs the metric ``name`` (without its stage prefix)."""
        raise NotImplementedError

    def _histograms_due(self) -> bool:
        """Whether the optimizer step in progress (number ``last + 1``) gets histograms."""
        every = self.histogram_every_n_steps
        return every > 0 and (self._last_global_step + 1) % every == 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_global_step = trainer.global_step  # resumed runs continue counting from the checkpoint
        for metric in (self._train, self._train_hist, self._val):
            metric.reset()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        record = _record(pl_module, "train")
        if record is None:
            return
        histograms = self._histograms_due()
        stats = self._collect(record, pl_module, histograms)
        hist = Stats(values=stats.values)
        stats.values = {}
        self._train.update(stats)
        if hist.values:
            self._train_hist.update(hist)
        if trainer.global_step == self._last_global_step:
            return  # gradient accumulation: the optimizer has not stepped yet
        self._last_global_step = trainer.global_step
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if every and trainer.global_step % every == 0:
            self._log(trainer, pl_module, self._train.compute(), TRAIN_PREFIX, on_step=True)
            self._train.reset()
        if self._train_hist.update_count:
            self._write_histograms(trainer, self._train_hist.compute(), TRAIN_PREFIX)
            self._train_hist.reset()

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        record = _record(pl_module, "val")
        stats = self._collect(record, pl_module, self.histogram_every_n_steps > 0) if record is not None else None
        if stats is not None and not trainer.sanity_checking:
            self._val.update(stats)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not self._val.update_count:
            self._val.reset()
            return
        values = self._val.compute()
        samples = {k: v for k, v in values.items() if k in self._val.sample_names()}
        scalars = {k: v for k, v in values.items() if k not in samples}
        self._log(trainer, pl_module, scalars, VAL_PREFIX, on_step=False)
        self._write_histograms(trainer, samples, VAL_PREFIX)
        self._val.reset()

    def _log(self, trainer: Trainer, pl_module: LightningModule, values: dict[str, Tensor], prefix: str,
             on_step: bool) -> None:
        values = {**values, **dead_fractions(values), **between_shares(values, "masks/")}
        # unit maxima and the moments behind between_variance_share stay internal
        scalars = {prefix + k: v for k, v in values.items() if v.ndim == 0 and not is_internal(k)}
        # Already reduced across ranks by WeightedStats.compute: no second sync.
        pl_module.log_dict(scalars, on_step=on_step, on_epoch=not on_step, sync_dist=False, batch_size=1)

    def _write_histograms(self, trainer: Trainer, samples: dict[str, Tensor], prefix: str) -> None:
        if not trainer.is_global_zero:
            return
        for writer in tensorboard_writers(trainer):
            for name, values in samples.items():
                if values.numel():
                    writer.add_histogram(prefix + name, values.cpu(), global_step=trainer.global_step)


class MaskStatistics(_StepStatistics):
    """Sparsity, L1 mass, max and histograms of the reward/KL masks, and dead learned units (module docstring).

    Objectives without masks (DPO, IPO, SimPO, TDPO) log nothing. Histograms go to TensorBoard loggers only,
    at ``trainer.global_step`` (optimizer steps done). A step skipped by ``NonFiniteGuard`` still counts as a step,
    so its NaN statistics show up in its window.
    """

    def __init__(self, log_every_n_steps: int | None = None, histogram_every_n_steps: int = 50) -> None:
        """
        Args:
            log_every_n_steps: optimizer steps per logged window; default the trainer's ``log_every_n_steps``.
                Values are averaged over every micro-batch and rank of the window.
            histogram_every_n_steps: write mask-value histograms of every N-th optimizer step (all its
                micro-batches and ranks) and of every validation run; 0 disables histograms.
        """
        super().__init__(log_every_n_steps, histogram_every_n_steps)
        self._units: UnitActivity | None = None

    def covers(self, name: str) -> bool:
        return name.startswith("masks/")

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._units is None:
            self._units = UnitActivity(getattr(pl_module, "masker", None))

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._units is not None:
            self._units.remove()
            self._units = None

    def _collect(self, record: StepRecord, pl_module: LightningModule, histograms: bool) -> Stats:
        units = self._units.pop() if self._units is not None else {}
        if record.masks is None:
            return Stats()
        stats = mask_stats(record.masks, record.stats.response_mask, histograms)
        stats = stats.merge(diagnostic_stats(record.masks, record.stats.response_mask))
        stats.maxima.update(units)
        targets = getattr(pl_module.masker, "sparsity_targets", dict)()
        stats.maxima.update({f"masks/target_sparsity_{name}": torch.tensor(value, device=record.masks.reward.device)
                             for name, value in targets.items()})
        return stats


class RewardStatistics(_StepStatistics):
    """Loss, logit, implicit rewards (margin, accuracy), log-probs, per-token and sequence KL (module docstring)."""

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        """
        Args:
            log_every_n_steps: optimizer steps per logged window; default the trainer's ``log_every_n_steps``.
        """
        super().__init__(log_every_n_steps, histogram_every_n_steps=0)

    def covers(self, name: str) -> bool:
        return not name.startswith("masks/")

    def _collect(self, record: StepRecord, pl_module: LightningModule, histograms: bool) -> Stats:
        if record.batch.desirable is not None:  # BCO on unpaired examples: no chosen/rejected halves
            stats = unpaired_stats(record.stats, record.out, record.batch.desirable)
        else:
            stats = loss_stats(record.out).merge(token_metrics(record.stats, record.masks))
        pairs = torch.full((1,), float(record.out.loss.shape[0]), device=record.out.loss.device)
        for name, value in record.metrics.items():  # the objective's own metrics: batch values weighted by pairs
            if self.covers(name) and name not in stats.means and name not in stats.maxima:
                stats.means[name] = (value.detach().float().reshape(1), pairs)
        return stats
