"""Objectives: small configurable objects that call the pure losses in ``losses.py``.

They are what configs select by ``class_path`` (``sparsepo_lightning.objectives.SparsePO``), and they
tell the module what each objective needs (the reference model, the full-vocabulary KL, token masks), so
the module never dispatches on names. Adding an objective = one pure function + one class + one test.

The module's step calls :meth:`Objective.step` and :meth:`Objective.metrics` (a pair objective keeps their defaults:
``objective(stats, masks)`` and ``metrics.preference_metrics``), and saves :meth:`Objective.state_dict` in checkpoints:
hooks for objectives with state (BCO's reward shift) or that train on unpaired examples (BCO again).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from sparsepo_lightning import losses
from sparsepo_lightning.errors import ConfigError
from sparsepo_lightning.metrics import preference_metrics, unpaired_stats
from sparsepo_lightning.running_mean import RunningMean
from sparsepo_lightning.types import LossOutput, PreferenceBatch, TokenMasks, TokenStats


@dataclass
class Objective(ABC):
    """Base of all objectives: ``objective(stats, masks) -> LossOutput`` with per-pair tensors.

    Subclasses are dataclasses whose fields are the objective's options (what configs set); the capability flags
    below are class variables, not options.
    """

    beta: float
    """Inverse temperature β (> 0)."""
    needs_reference: ClassVar[bool] = True
    """Whether the reference model must be run (False for reference-free objectives such as SimPO)."""
    needs_kl: ClassVar[bool] = False
    """Whether the full-vocabulary KL(π_ref‖π_θ) per token is used."""
    uses_masks: ClassVar[bool] = False
    """Whether token masks enter the loss (SparsePO, WeightedDPO, MaskedSimPO)."""
    reference_cache_fields: ClassVar[tuple[str, ...] | None] = ("reference_logps",)
    """The ``TokenStats`` fields of the reference the loss reads, all of which ``model.reference_cache`` can store
    (``reference_cache.CACHEABLE``); None when it needs the live reference (the full-vocabulary KL of TDPO)."""

    @abstractmethod
    def __call__(self, stats: TokenStats, masks: TokenMasks | None) -> LossOutput: ...

    def effective_masks(self, masks: TokenMasks | None, response_mask: Tensor) -> TokenMasks | None:
        """The masks as the loss uses them (None when the objective ignores masks), for logging."""
        return masks if self.uses_masks else None

    def __post_init__(self) -> None:
        losses.check_beta(self.beta, type(self).__name__)

    def distribution_statistics(self) -> dict:
        """Full-distribution statistics the loss reads from ``stats.distribution`` (with gradient), by name:
        ``{name: distributions.DistributionStatistic}`` (docs/full-distribution.md). Default: none."""
        return {}

    def step(self, stats: TokenStats, masks: TokenMasks | None, batch: PreferenceBatch, training: bool) -> LossOutput:
        """The loss of one batch, as the module's step computes it (``training``: a training step, the only one
        in which an objective may update its state). Default: ``self(stats, masks)``, on pairs only."""
        if batch.desirable is not None:
            raise ConfigError(
                f"model.objective={type(self).__name__} learns from preference pairs, but the data module gives "
                "unpaired examples (prompt, completion, label). Fix: model.objective: "
                "sparsepo_lightning.objectives.BCO, or paired data (data.class_path: "
                "sparsepo_lightning.data.PreferenceDataModule).")
        return self(stats, masks)

    def metrics(self, stats: TokenStats, masks: TokenMasks | None, out: LossOutput,
                batch: PreferenceBatch) -> dict[str, Tensor]:
        """The scalar metrics the module logs for one batch (``masks`` as ``effective_masks`` returns them)."""
        return preference_metrics(stats, masks, out)

    def state_dict(self) -> dict[str, Any]:
        """State that checkpoints carry (none for a stateless objective); ``load_state_dict`` restores it."""
        return {}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state_dict` (``state`` is None when the checkpoint holds no objective state)."""
        if state:
            rank_zero_warn(f"The checkpoint holds objective state ({', '.join(state)}) that "
                           f"{type(self).__name__} does not use; it is ignored.")


@dataclass
class DPO(Objective):
    """Direct Preference Optimization (sigmoid loss on the sequence log-ratio margin)."""

    beta: float = 0.1
    """Inverse temperature β."""

    def __call__(self, stats: TokenStats, masks: TokenMasks | None = None) -> LossOutput:
        return losses.dpo_loss(stats, self.beta)


@dataclass
class IPO(Objective):
    """Identity Preference Optimisation (squared loss towards the margin 1/(2β))."""

    beta: float = 0.1
    """Regularisation strength β (target margin 1/(2β))."""

    def __call__(self, stats: TokenStats, masks: TokenMasks | None = None) -> LossOutput:
        return losses.ipo_loss(stats, self.beta)


@dataclass
class SimPO(Objective):
    """Simple Preference Optimisation: reference-free, length-normalised log-likelihood margin."""

    beta: float = 2.0
    """Reward scale β."""
    gamma_beta_ratio: float = 0.5
    """Target margin γ expressed as γ/β."""
    needs_reference: ClassVar[bool] = False

    def __call__(self, stats: TokenStats, masks: TokenMasks | None = None) -> LossOutput:
        return losses.simpo_loss(stats, self.beta, self.gamma_beta_ratio)


@dataclass
class DPOP(Objective):
    """DPO-Positive (Smaug): DPO plus a penalty when the chosen log-ratio falls below zero."""

    beta: float = 0.1
    """Inverse temperature β."""
    lambda_: float = 50.0
    """Weight λ of ``max(0, −Σρ_w)``."""

    def __call__(self, stats: TokenStats, masks: TokenMasks | None = None) -> LossOutput:
        return losses.dpop_loss(stats, self.beta, self.lambda_)


@dataclass
class WeightedDPO(Objective):
    """DPO with per-token weights from a masker (``losses.weighted_dpo_loss``): ``m_u`` scales each token's log-ratio,
    i.e. a per-token β. The objective of the token-weighting plug-ins (``sparsepo_lightning.methods``); with
    ``UniformMasker`` (or no masker) it is DPO exactly."""

    beta: float = 0.1
    """Inverse temperature β (per token: β·m_u)."""
    uses_masks: ClassVar[bool] = True

    def effective_masks(self, masks: TokenMasks | None, response_mask: Tensor) -> TokenMasks | None:
        return TokenMasks.ones_like(response_mask) if masks is None else masks

    def __call__(self, stats: TokenStats, masks: TokenMasks | None = None) -> LossOutput:
        return losses.weighted_dpo_loss(stats, masks, self.beta)


@dataclass
class MaskedSimPO(Objective):
    """Reference-free loss on the mean policy log-prob of the tokens a masker selects
    (``losses.masked_simpo_loss``): ConfPO's and SePO's objective; with no masker, SimPO with ``γ = margin``."""

    beta: float = 2.0
    """Scale β of the mean log-probs (ConfPO 1.5, SePO's γ 2.1)."""
    margin: float = 1.0
    """Target margin subtracted from the scaled difference (ConfPO's γ 1.6, SePO's λ 0.5)."""
    needs_reference: ClassVar[bool] = False
    uses_masks: ClassVar[bool] = True

    def effective_masks(self, masks: TokenMasks | None, response_mask: Tensor) -> TokenMasks | None:
        return TokenMasks.ones_like(response_mask) if masks is None else masks

    def __call__(self, stats: TokenStats, masks: TokenMasks | None = None) -> LossOutput:
        return losses.masked_simpo_loss(stats, masks, self.beta, self.margin)


@dataclass
class TDPO1(Objective):
    """Token-level DPO with the sequential KL difference (TDPO1)."""

    beta: float = 0.1
    """Inverse temperature β."""
    needs_kl: ClassVar[bool] = True
    reference_cache_fields: ClassVar[tuple[str, ...] | None] = None  # the KL reads the reference's distribution

    def __call__(self, stats: TokenStats, masks: TokenMasks | None = None) -> LossOutput:
        return losses.tdpo1_loss(stats, self.beta)


@dataclass
class TDPO2(Objective):
    """TDPO2: the chosen response's sequential KL is stop-gradiented and the KL term scaled by α."""

    beta: float = 0.1
    """Inverse temperature β."""
    alpha: float = 0.5
    """Weight α of the KL term."""
    needs_kl: ClassVar[bool] = True
    reference_cache_fields: ClassVar[tuple[str, ...] | None] = None  # the KL reads the reference's distribution

    def __call__(self, stats: TokenStats, masks: TokenMasks | None = None) -> LossOutput:
        return losses.tdpo2_loss(stats, self.beta, alpha=self.alpha)


@dataclass
class SparsePO(Objective):
    """SparsePO (docs/method.md §1.2): token masks weight the reward (ρ) and KL terms; L1 pushes them to sparsity."""

    beta: float = 0.8
    """Inverse temperature β, outside the bracket (masks act as per-token β)."""
    l1_reward: float = 0.0
    """λ_u, L1 coefficient on the reward mask (halved with common masks when both masks are on)."""
    l1_kl: float = 0.0
    """λ_d, L1 coefficient on the KL mask (halved with common masks when both masks are on)."""
    mask_on_reward: bool = True
    """Weight the per-token log-ratios by the reward mask (else mask ≡ 1, no λ_u term)."""
    mask_on_kl: bool = True
    """Weight the per-token KL by the KL mask (else mask ≡ 1, no λ_d term)."""
    needs_kl: ClassVar[bool] = True
    reference_cache_fields: ClassVar[tuple[str, ...] | None] = None  # the KL reads the reference's distribution
    uses_masks: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        losses.check_sparsepo_options(self.l1_reward, self.l1_kl, self.mask_on_reward, self.mask_on_kl)

    def effective_masks(self, masks: TokenMasks | None, response_mask: Tensor) -> TokenMasks | None:
        ones = TokenMasks.ones_like(response_mask)
        if masks is None:
            return ones
        return TokenMasks(reward=masks.reward if self.mask_on_reward else ones.reward,
                          kl=masks.kl if self.mask_on_kl else ones.kl, learned=masks.learned)

    def __call__(self, stats: TokenStats, masks: TokenMasks | None) -> LossOutput:
        if masks is None:
            masks = TokenMasks.ones_like(stats.response_mask)
        return losses.sparsepo_loss(stats, masks, self.beta, self.l1_reward, self.l1_kl,
                                    self.mask_on_reward, self.mask_on_kl)


@dataclass
class BCO(Objective):
    """Binary Classifier Optimization (Jung et al. 2025, arXiv 2404.04656): each response is classified desirable or
    undesirable by its reward ``r = β Σρ`` shifted by ``δ``, the running mean of all training rewards
    (``losses.bco_loss``). Trains on pairs (chosen = desirable, rejected = undesirable) and on unpaired examples.

    ``δ`` is state, not an option: the count-weighted mean of every per-example reward of the training steps so far
    (as TRL's ``BCOTrainer``: all ranks' rewards, updated with the current batch before its loss; validation and
    test steps read it without updating it), 0 before the first training step. It is saved in checkpoints
    (``state_dict``) and restored on resume. Unlike TRL's ``bco_pair`` (DPO trainer), which adds one batch mean per
    step, every reward counts once, paired or not. TRL's optional prompt-distribution matching (UDM) is not
    implemented.
    """

    beta: float = 0.1
    """Reward scale β (the paper's and TRL's default 0.1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.reward_shift = RunningMean()
        """δ: the running mean of the training rewards (not a dataclass field, so not a config option)."""

    def __call__(self, stats: TokenStats, masks: TokenMasks | None = None,
                 desirable: Tensor | None = None) -> LossOutput:
        """The loss at the current δ, which it does not update (``step`` does, in training)."""
        return losses.bco_loss(stats, self.beta, self.reward_shift.value(stats.policy_logps), desirable)

    def step(self, stats: TokenStats, masks: TokenMasks | None, batch: PreferenceBatch, training: bool) -> LossOutput:
        if training:
            self.reward_shift.update(losses.bco_rewards(stats, self.beta))
        return self(stats, masks, batch.desirable)

    def metrics(self, stats: TokenStats, masks: TokenMasks | None, out: LossOutput,
                batch: PreferenceBatch) -> dict[str, Tensor]:
        """The pair metrics (``rewards/*`` of chosen and rejected), or for unpaired examples
        ``metrics.unpaired_stats``; both with ``rewards/delta``, the shift δ the loss used."""
        values = (preference_metrics(stats, masks, out) if batch.desirable is None
                  else unpaired_stats(stats, out, batch.desirable).reduce())
        return {**values, "rewards/delta": self.reward_shift.value(out.loss).detach().clone()}

    def state_dict(self) -> dict[str, Any]:
        return {"reward_shift": self.reward_shift.state_dict()}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is None or "reward_shift" not in state:
            rank_zero_warn("BCO: the checkpoint holds no reward shift δ (it was not written by a BCO run); δ starts "
                           "again from 0, as at the start of training.")
            self.reward_shift = RunningMean()
            return
        self.reward_shift.load_state_dict(state["reward_shift"])
