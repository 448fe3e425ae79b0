"""AlignDistil: token-level alignment as distillation toward a teacher built from a DPO and a reverse-DPO model.

Zhang et al., *AlignDistil: Token-Level Language Model Alignment as Adaptive Policy Distillation*, ACL 2025,
arXiv 2503.02832. The paper shows that RLHF with a DPO reward, ``max E[r] − β KL(π_θ‖π_ref)`` with
``r = β₀ log π_dpo/π_ref``, is token-level distillation toward ``π*(·|s_t) ∝ π_ref · (π_dpo/π_ref)^{β₀/β}``, whose
logits are a linear combination of the reference's and the DPO model's. It then replaces the reference in the
reward by a *reverse* DPO model (trained on the swapped pairs): the contrastive DPO reward
``r_t(v) = β₀ [log π_dpo(v|s_t) − log π_rdpo(v|s_t)]``, and lets the extrapolation weight vary per token. Here,
at every response position t of both responses of a pair (the off-policy variant: the data's responses):

    d_t   = log π_dpo(·|s_t) − log π_rdpo(·|s_t)                 (contrastive token reward / β₀, a V-vector)
    TV_t  = ½ Σ_v |π_dpo(v|s_t) − π_rdpo(v|s_t)|                  (how much the two models disagree at t)
    α_t   = min(γ / TV_t, α_max)            (adaptive: true)      or   α_t = α      (adaptive: false)
    π*_t  = softmax(z_ref,t + α_t · d_t)                           (teacher; z: logits; log-softmax constants cancel)
    D_t   = KL(π_θ(·|s_t) ‖ π*_t) = Σ_v π_θ (log π_θ − log π*_t)
    loss  = ½ [mean_t D_t (chosen) + mean_t D_t (rejected)]        per pair

Choices where the paper leaves room or where this file could not follow it line by line (no released code was
available to check against): (1) the divergence is the reverse KL ``KL(π_θ‖π*)``, the one RLHF is equivalent to
(the paper's derivation); (2) the token-adaptive weight decreases with the total-variation distance between
``π_dpo`` and ``π_rdpo`` at t — large where they barely disagree (their logit difference is small: avoid
under-optimising), small where they disagree strongly (avoid over-optimising); the form ``min(γ / TV_t, α_max)``
and the defaults γ = 0.1, α_max = 4 are this package's; (3) the teacher carries no gradient (π_ref, π_dpo,
π_rdpo are frozen; α_t and TV_t are computed from them only); (4) per-token divergences are averaged over each
response and the two responses of a pair weigh equally; (5) the logged rewards (``rewards/*``) are DPO's implicit
rewards ``β Σ_t ρ^t`` for monitoring only — ``beta`` does not enter the loss.

The DPO and reverse-DPO models are ``model.frozen_models`` (names ``dpo`` and ``reverse_dpo`` by default). The
divergence is a full-vocabulary statistic computed in the fused chunked pass (``distributions.py``) with an
in-place closed-form gradient ``∂D_t/∂z_θ = π_θ ⊙ (log π_θ − log π*_t − D_t)``: per chunk it holds at most two
``(chunk, V)`` float32 buffers at once, like the KL path (benchmarks/bench_distribution_memory.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from sparsepo_lightning.distributions import (
    REFERENCE,
    ROW_BLOCK,
    ChunkLogits,
    DistributionStatistic,
    log_softmax_,
    rowdot,
)
from sparsepo_lightning.errors import ConfigError
from sparsepo_lightning.losses import pair_sums, split_pairs
from sparsepo_lightning.metrics import preference_metrics
from sparsepo_lightning.objectives import Objective
from sparsepo_lightning.types import LossOutput, PreferenceBatch, TokenMasks, TokenStats

STATISTIC = "aligndistil_kl"
"""The name of ``D_t`` in ``TokenStats.distribution``."""


class TeacherDivergence(DistributionStatistic):
    """``D_t = KL(π_θ(·|s_t) ‖ π*_t)`` with AlignDistil's teacher ``π*_t = softmax(z_ref + α_t d_t)`` (module doc).

    Args:
        dpo, reverse_dpo: names of the two models in ``model.frozen_models``.
        adaptive: token-adaptive ``α_t = min(γ / TV_t, α_max)``; False: the constant ``alpha``.
        gamma, alpha_max, alpha: as in the module docstring.
    """

    reads_reference = True

    def __init__(self, dpo: str, reverse_dpo: str, adaptive: bool, gamma: float, alpha_max: float,
                 alpha: float) -> None:
        self.dpo, self.reverse_dpo = dpo, reverse_dpo
        self.adaptive, self.gamma, self.alpha_max, self.alpha = adaptive, gamma, alpha_max, alpha

    def frozen_model_names(self) -> tuple[str, ...]:
        return (self.dpo, self.reverse_dpo)

    def extrapolation(self, log_dpo: Tensor, log_rdpo: Tensor) -> Tensor:
        """``α_t`` per position, ``(c,)``, from the two models' log-probs ``(c, V)``."""
        if not self.adaptive:
            return log_dpo.new_full(log_dpo.shape[:1], self.alpha)
        tv = torch.cat([0.5 * (log_dpo[i:i + ROW_BLOCK].exp() - log_rdpo[i:i + ROW_BLOCK].exp()).abs().sum(-1)
                        for i in range(0, log_dpo.shape[0], ROW_BLOCK)] or [log_dpo.new_zeros(0)])
        return (self.gamma / tv.clamp_min(1e-12)).clamp_max(self.alpha_max)

    def teacher_log_probs(self, logits: ChunkLogits) -> Tensor:
        """``log π*_t``, ``(c, V)`` float32, built in place (at most two ``(c, V)`` buffers alive)."""
        d = log_softmax_(logits[self.dpo])
        log_rdpo = log_softmax_(logits[self.reverse_dpo])
        alpha = self.extrapolation(d, log_rdpo)
        d.sub_(log_rdpo).mul_(alpha[:, None])  # α_t · d_t, in place
        del log_rdpo
        teacher = logits[REFERENCE].add_(d)
        del d
        return log_softmax_(teacher)

    def _difference(self, logits: ChunkLogits) -> tuple[Tensor, Tensor]:
        """``(π_θ, log π_θ − log π*)``, both ``(c, V)``."""
        diff = self.teacher_log_probs(logits)
        log_p = log_softmax_(logits["policy"])
        diff.sub_(log_p).neg_()
        return log_p.exp_(), diff

    def __call__(self, logits: ChunkLogits) -> Tensor:
        p, diff = self._difference(logits)
        return rowdot(p, diff)

    def policy_grad(self, logits: ChunkLogits, grad: Tensor) -> Tensor:
        """``g_t · π_θ ⊙ (log π_θ − log π*_t − D_t)``, in place on the difference buffer."""
        p, diff = self._difference(logits)
        kl = rowdot(p, diff)
        return diff.sub_(kl[:, None]).mul_(p).mul_(grad[:, None])


@dataclass
class AlignDistil(Objective):
    """AlignDistil's off-policy loss (module docstring): per-token reverse KL to the adaptive teacher, averaged."""

    beta: float = 0.1
    """Scale of the logged implicit rewards ``β Σρ`` (monitoring only; not in the loss)."""
    gamma: float = 0.1
    """γ of the adaptive weight ``α_t = min(γ / TV_t, α_max)``."""
    alpha_max: float = 4.0
    """Upper bound of ``α_t``."""
    adaptive: bool = True
    """Token-adaptive ``α_t``; False: the constant ``alpha`` at every token."""
    alpha: float = 1.0
    """The constant extrapolation weight when ``adaptive`` is false (the paper's β₀/β)."""
    dpo: str = "dpo"
    """Name of the DPO model in ``model.frozen_models``."""
    reverse_dpo: str = "reverse_dpo"
    """Name of the reverse-DPO model (trained on swapped pairs) in ``model.frozen_models``."""
    needs_reference: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("gamma", "alpha_max", "alpha"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"AlignDistil: {name} must be >= 0, got {getattr(self, name)}.")
        if self.dpo == self.reverse_dpo:
            raise ConfigError(f"AlignDistil: dpo and reverse_dpo name the same frozen model ({self.dpo!r}); the "
                              "teacher contrasts two different models. Fix: model.frozen_models: {dpo: <path>, "
                              "reverse_dpo: <path>}.")

    def distribution_statistics(self) -> dict[str, DistributionStatistic]:
        return {STATISTIC: TeacherDivergence(self.dpo, self.reverse_dpo, self.adaptive, self.gamma, self.alpha_max,
                                             self.alpha)}

    def __call__(self, stats: TokenStats, masks: TokenMasks | None = None) -> LossOutput:
        if STATISTIC not in stats.distribution:
            raise ValueError(f"AlignDistil reads TokenStats.distribution[{STATISTIC!r}]; run it through "
                             "PreferenceModule (or distributions.distribution_stats).")
        mask = stats.response_mask
        per_row = (stats.distribution[STATISTIC] * mask).sum(-1) / mask.sum(-1).clamp_min(1)
        chosen_kl, rejected_kl = split_pairs(per_row)
        chosen, rejected = pair_sums(stats.log_ratio, mask)
        loss = 0.5 * (chosen_kl + rejected_kl)
        return LossOutput(loss=loss, logit=(self.beta * (chosen - rejected)).detach(),
                          chosen_reward=(self.beta * chosen).detach(), rejected_reward=(self.beta * rejected).detach(),
                          penalty=torch.zeros_like(loss))

    def metrics(self, stats: TokenStats, masks: TokenMasks | None, out: LossOutput,
                batch: PreferenceBatch) -> dict[str, Tensor]:
        """The preference metrics plus ``aligndistil/kl``: the mean per-token divergence to the teacher."""
        mask = stats.response_mask
        kl = (stats.distribution[STATISTIC].detach() * mask).sum() / mask.sum().clamp_min(1)
        return {**preference_metrics(stats, masks, out), "aligndistil/kl": kl}
