"""Training metrics (docs/method.md §5): one definition of each, used by the module's per-batch ``train/*`` /
``val/*`` values and by the ``MaskStatistics`` / ``RewardStatistics`` callbacks' exact windows.

Every metric is computed from the *same* tensors as the loss, in float32, with the problems of the released code's
metrics fixed (docs/method.md §8.6). Each function returns a :class:`Stats`: per-item values with weights (the
value of a batch or of a logging window is ``Σ v·w / Σ w``) and maxima. Names:

- ``loss``, ``logit`` (argument of −log σ), ``penalty`` (mask L1 part of the loss),
  ``rewards/{chosen,rejected,margin,accuracy}``: the objective's implicit rewards (for TDPO1/SparsePO
  ``β(Σ m_u ρ + K)``, so the margin equals the logit; the released code subtracted K, §1.3); per pair;
- ``logps/{chosen,rejected}``: Σ policy log-probs over response tokens; per response;
- ``kl/seq_{chosen,rejected}``: unmasked sequence KL(π_ref‖π_θ) over response tokens only (the released
  learned-mask trainer also summed prompt and padding positions); per response;
- ``kl/token_{chosen,rejected}``: KL per response token, weighted by token counts (Σ KL / Σ tokens);
- ``kl/masked_{chosen,rejected}``: Σ m_d·KL (the K_w, K_l of the loss); per response;
- ``masks/sparsity_{reward,kl}_{chosen,rejected}``: % of exact zeros among response tokens, per response;
  ``masks/l1_{reward,kl}_{chosen,rejected}``: Σ|m| per response; ``masks/max_{reward,kl}``: max over response
  tokens; ``masks/mean_{reward,kl}``: mean mask value over all response tokens (the factor by which the masks
  scale β on an average token: 1 for uniform masks).

Unpaired examples (BCO, ``PreferenceBatch.desirable`` set) have no pairs, hence no chosen/rejected halves:
:func:`unpaired_stats` gives ``loss``, ``logit`` and ``rewards/margin`` (both the classifier margin ``s(r − δ)``),
``rewards/accuracy`` (margin > 0), ``rewards/{desirable,undesirable}`` and ``logps/{desirable,undesirable}`` (means
over the examples of each label), per example.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from sparsepo_lightning.losses import split_pairs
from sparsepo_lightning.types import LossOutput, TokenMasks, TokenStats


@dataclass
class Stats:
    """Per-batch contributions to a metric.

    Attributes:
        means: name -> ``(values, weights)`` of equal shape; the value is ``Σ v·w / Σ w``.
        maxima: name -> a tensor; the value over several batches is the elementwise max.
        values: name -> a 1-D tensor of samples (histograms).
    """

    means: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    maxima: dict[str, Tensor] = field(default_factory=dict)
    values: dict[str, Tensor] = field(default_factory=dict)

    def merge(self, other: Stats) -> Stats:
        """A new ``Stats`` holding the entries of both (``other`` wins on equal names)."""
        return Stats({**self.means, **other.means}, {**self.maxima, **other.maxima}, {**self.values, **other.values})

    def reduce(self) -> dict[str, Tensor]:
        """Scalar value of every mean and maximum of this batch (no host sync). A maximum over no token (an
        empty response mask) is reported as 0 rather than −inf."""
        out = {name: (v.float() * w).sum() / w.float().sum().clamp(min=1e-12) for name, (v, w) in self.means.items()}
        out.update({name: torch.nan_to_num(v.float(), neginf=0.0) for name, v in self.maxima.items()})
        return out


def per_response(stats: Stats, name: str, values: Tensor, sep: str = "_", weights: Tensor | None = None) -> None:
    """Register a per-response value ``(2B,)`` as ``{name}{sep}chosen`` and ``{name}{sep}rejected``, weighted by
    ``weights`` ``(2B,)`` (default 1: a mean over responses)."""
    weights = torch.ones_like(values) if weights is None else weights
    for side, rows, row_weights in zip(("chosen", "rejected"), split_pairs(values), split_pairs(weights), strict=True):
        stats.means[f"{name}{sep}{side}"] = (rows, row_weights)


def response_sparsity(mask: Tensor, response_mask: Tensor) -> Tensor:
    """% of exact zeros of ``mask`` among each row's response tokens (docs/method.md §5), ``(2B,)`` float32.

    Computed in fp32: tiny fp16 mask values would underflow to 0 and count as sparse.
    """
    zeros = ((mask.detach().float() == 0) & response_mask).float().sum(-1)
    return 100.0 * zeros / response_mask.sum(-1).clamp(min=1)


def loss_stats(out: LossOutput) -> Stats:
    """``loss``, ``logit``, ``penalty`` and ``rewards/*`` of one batch, one value per pair."""
    margin = out.chosen_reward - out.rejected_reward
    values = {"loss": out.loss, "logit": out.logit, "penalty": out.penalty, "rewards/chosen": out.chosen_reward,
              "rewards/rejected": out.rejected_reward, "rewards/margin": margin,
              "rewards/accuracy": (margin > 0).float()}
    ones = torch.ones_like(out.logit, dtype=torch.float32)
    return Stats(means={name: (value.detach().float(), ones) for name, value in values.items()})


def unpaired_stats(stats: TokenStats, out: LossOutput, desirable: Tensor) -> Stats:
    """The metrics of one batch of unpaired examples (``losses.bco_loss`` with ``desirable``), one value per example;
    a label with no example in the batch weighs 0 (its mean reads 0 for that batch alone)."""
    ones, good = torch.ones_like(out.logit, dtype=torch.float32), desirable.float()
    logit = out.logit.detach().float()
    logps = (stats.policy_logps.detach().float() * stats.response_mask).sum(-1)
    rewards = (out.chosen_reward + out.rejected_reward).detach().float()
    means = {"loss": (out.loss.detach().float(), ones), "logit": (logit, ones), "penalty": (out.penalty.float(), ones),
             "rewards/margin": (logit, ones), "rewards/accuracy": ((logit > 0).float(), ones),
             "rewards/desirable": (rewards, good), "rewards/undesirable": (rewards, 1 - good),
             "logps/desirable": (logps, good), "logps/undesirable": (logps, 1 - good)}
    return Stats(means=means)


def token_metrics(stats: TokenStats, masks: TokenMasks | None) -> Stats:
    """``logps/*``, ``kl/seq_*``, ``kl/token_*`` and (with masks) ``kl/masked_*`` of one batch."""
    out, resp = Stats(), stats.response_mask
    per_response(out, "logps", (stats.policy_logps.detach().float() * resp).sum(-1), sep="/")
    if stats.kl is None:  # objectives without KL, called through the functional API
        return out
    kl = stats.kl.detach().float() * resp  # (2B, T-1)
    per_response(out, "kl/seq", kl.sum(-1))
    counts = resp.sum(-1).float()
    per_response(out, "kl/token", kl.sum(-1) / counts.clamp(min=1), weights=counts)  # Σ KL / Σ tokens
    if masks is not None:
        per_response(out, "kl/masked", (kl * masks.kl.detach().float()).sum(-1))
    return out


def mask_stats(masks: TokenMasks, response_mask: Tensor, histograms: bool = False) -> Stats:
    """Sparsity, L1 mass, max and mean of the reward and KL masks of one batch, in float32.

    Args:
        masks: ``(2B, T-1)`` masks as the loss used them (chosen rows first).
        response_mask: ``(2B, T-1)`` bool, True on response tokens.
        histograms: also return the mask values over response tokens (``values``) for histograms; the KL
            histograms are skipped when the KL mask is the reward mask (common masks).
    """
    stats = Stats()
    same = masks.kl.data_ptr() == masks.reward.data_ptr() and masks.kl.shape == masks.reward.shape
    counts = response_mask.sum(-1).float()
    for name, mask in (("reward", masks.reward), ("kl", masks.kl)):
        mask = mask.detach().float()  # fp32: tiny fp16 values would underflow to 0 and count as sparse
        per_response(stats, f"masks/sparsity_{name}", response_sparsity(mask, response_mask))
        mass = (mask.abs() * response_mask).sum(-1)
        per_response(stats, f"masks/l1_{name}", mass)
        stats.means[f"masks/mean_{name}"] = ((mask * response_mask).sum(-1) / counts.clamp(min=1), counts)
        stats.maxima[f"masks/max_{name}"] = mask.masked_fill(~response_mask, -torch.inf).amax()
        if histograms and not (name == "kl" and same):
            chosen, rejected = split_pairs(mask)
            chosen_resp, rejected_resp = split_pairs(response_mask)
            stats.values[f"masks/{name}_chosen"] = chosen[chosen_resp]
            stats.values[f"masks/{name}_rejected"] = rejected[rejected_resp]
    return stats


def preference_metrics(stats: TokenStats, masks: TokenMasks | None, out: LossOutput) -> dict[str, Tensor]:
    """All logged metrics of one batch as scalar tensors, detached (the module's ``train/*``, ``val/*``)."""
    batch = loss_stats(out).merge(token_metrics(stats, masks))
    if masks is not None:
        batch = batch.merge(mask_stats(masks, stats.response_mask))
    return batch.reduce()


PROGRESS_BAR_METRICS = ("loss", "rewards/margin", "masks/sparsity_reward_chosen")
"""Metrics shown in the progress bar (all are logged)."""


def log_metrics(module: LightningModule, stage: str, metrics: dict[str, Tensor], batch_size: int,
                exact: Callable[[str], bool] | None = None) -> None:
    """Log ``stage/name`` for every metric: per step in training, epoch means (synchronised) in validation/test.

    A training or validation metric for which ``exact(name)`` holds (a statistics callback logs it exactly, as
    ``train_step/name`` / ``val_epoch/name``) is kept out of the loggers: it stays in ``trainer.callback_metrics``
    (progress bar, run summary, checkpoint and early-stopping monitors) without a second series in TensorBoard."""
    train = stage == "train"
    for name, value in metrics.items():
        logger = exact is None or stage not in ("train", "val") or not exact(name)
        module.log(f"{stage}/{name}", value, prog_bar=name in PROGRESS_BAR_METRICS, logger=logger, on_step=train,
                   on_epoch=not train, sync_dist=not train, batch_size=batch_size)
