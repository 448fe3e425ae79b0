"""AlignDistil: token-level alignment as distillation toward a teacher built from a DPO and a reverse-DPO model.

Zhang et al., *AlignDistil: Token-Level Language Model Alignment as Adaptive Policy Distillation*, ACL 2025,
arXiv 2503.02832; released code: github.com/songmzhang/AlignDistil at commit 0c7e5c56,
``OpenRLHF/openrlhf/trainer/aligndistil_offpolicy_trainer.py`` (``reward_boost_type == "aligndistil"``) and its
off-policy script ``train_scripts/ultrafeedback/qwen2.5-1.5b/aligndistil_off_policy.sh``. The paper shows that
RLHF with a DPO reward is token-level distillation toward a teacher whose logits combine the models', and replaces
the reference in the reward by a *reverse* DPO model (trained on the swapped pairs), with an extrapolation weight
that varies per token. This file follows the released off-policy trainer; at every response position t:

    α_t   = r · Σ_v |π_dpo(v|s_t) − π_rdpo(v|s_t)| + ε   (adaptive: true; r = tv_scale, ε = epsilon)
            or the constant α                             (adaptive: false; the released "theorem1_contrast")
    log π*_t = log_softmax(log π_dpo + α_t (log π_dpo − log π_rdpo))   (teacher; as the released
               ``α(z_dpo − z_rdpo) + z_dpo`` on logits: the per-position log-normalisers cancel in the softmax)
    ℓ_t   = (β / α_t) · KL(π_θ(·|s_t) ‖ π*_t) = (β / α_t) Σ_v π_θ (log π_θ − log π*_t)
    loss  = mean over the response's tokens of ℓ_t, for the chosen response  (responses: chosen, the released
            off-policy trainer's ``input_ids = chosen_ids``), or the mean of both responses' (responses: both)

Defaults are the released script's: β = 0.1, r = 10 (its ``beta2``), ε = 1e-3, length-normalised per response
(``--reward_len_norm``). The teacher and α_t carry no gradient (the frozen models run without one). One deliberate
difference: the released trainer pairs the logits at position t with the label mask at t (no shift); here position
t's distribution predicts token t + 1, as everywhere in this package. The reference model is loaded only for the
logged implicit rewards ``β Σ_t ρ^t`` (``rewards/*``, validation accuracy and margin), which are not in the loss.

Worked by hand (tests/test_full_distribution_methods.py): V = 3, π_dpo = (½, ¼, ¼), π_rdpo uniform: Σ|Δπ| = ⅓; with
r = 6, ε = 0: α = 2, π* ∝ π_dpo³ = (0.8, 0.1, 0.1); a uniform policy has KL = 0.510826 and, with β = 0.1,
ℓ = 0.05 × 0.510826.

The DPO and reverse-DPO models are ``model.frozen_models`` (names ``dpo`` and ``reverse_dpo`` by default). ℓ_t is a
full-vocabulary statistic computed in the fused chunked pass (``distributions.py``) with an in-place closed-form
gradient ``∂ℓ_t/∂z_θ = (β/α_t) π_θ ⊙ (log π_θ − log π*_t − KL_t)``: per chunk it holds at most two ``(chunk, V)``
float32 buffers at once, like the KL path (benchmarks/bench_distribution_memory.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from sparsepo_lightning.distributions import (
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
    """``ℓ_t = (β/α_t) · KL(π_θ(·|s_t) ‖ π*_t)`` with AlignDistil's teacher (module docstring).

    Args:
        dpo, reverse_dpo: names of the two models in ``model.frozen_models``.
        beta: β of the per-token scale ``β/α_t``.
        adaptive: token-adaptive ``α_t = r Σ|π_dpo − π_rdpo| + ε``; False: the constant ``alpha``.
        tv_scale, epsilon, alpha: r, ε and the constant α of the module docstring.
    """

    def __init__(self, dpo: str, reverse_dpo: str, beta: float, adaptive: bool, tv_scale: float, epsilon: float,
                 alpha: float) -> None:
        self.dpo, self.reverse_dpo, self.beta = dpo, reverse_dpo, beta
        self.adaptive, self.tv_scale, self.epsilon, self.alpha = adaptive, tv_scale, epsilon, alpha

    def frozen_model_names(self) -> tuple[str, ...]:
        return (self.dpo, self.reverse_dpo)

    def extrapolation(self, log_dpo: Tensor, log_rdpo: Tensor) -> Tensor:
        """``α_t`` per position, ``(c,)``, from the two models' log-probs ``(c, V)``."""
        if not self.adaptive:
            return log_dpo.new_full(log_dpo.shape[:1], self.alpha)
        l1 = torch.cat([(log_dpo[i:i + ROW_BLOCK].exp() - log_rdpo[i:i + ROW_BLOCK].exp()).abs().sum(-1)
                        for i in range(0, log_dpo.shape[0], ROW_BLOCK)] or [log_dpo.new_zeros(0)])
        return l1.mul_(self.tv_scale).add_(self.epsilon)

    def teacher_log_probs(self, logits: ChunkLogits) -> tuple[Tensor, Tensor]:
        """``(log π*_t, α_t)``: ``(c, V)`` float32 built in place (at most two ``(c, V)`` buffers alive), ``(c,)``."""
        log_dpo = log_softmax_(logits[self.dpo])
        contrast = log_softmax_(logits[self.reverse_dpo])
        alpha = self.extrapolation(log_dpo, contrast)
        contrast.sub_(log_dpo).mul_(-alpha[:, None])  # α_t (log π_dpo − log π_rdpo), in place
        teacher = log_dpo.add_(contrast)
        del contrast
        return log_softmax_(teacher), alpha

    def _difference(self, logits: ChunkLogits) -> tuple[Tensor, Tensor, Tensor]:
        """``(π_θ, log π_θ − log π*, β/α_t)``: ``(c, V)``, ``(c, V)``, ``(c,)``."""
        diff, alpha = self.teacher_log_probs(logits)
        log_p = log_softmax_(logits["policy"])
        diff.sub_(log_p).neg_()
        return log_p.exp_(), diff, self.beta / alpha

    def __call__(self, logits: ChunkLogits) -> Tensor:
        p, diff, scale = self._difference(logits)
        return rowdot(p, diff) * scale

    def policy_grad(self, logits: ChunkLogits, grad: Tensor) -> Tensor:
        """``g_t (β/α_t) π_θ ⊙ (log π_θ − log π*_t − KL_t)``, in place on the difference buffer."""
        p, diff, scale = self._difference(logits)
        kl = rowdot(p, diff)
        return diff.sub_(kl[:, None]).mul_(p).mul_((grad * scale)[:, None])


@dataclass
class AlignDistil(Objective):
    """AlignDistil's off-policy loss (module docstring): per-token reverse KL to the adaptive teacher, scaled by
    ``β/α_t`` and averaged over the chosen response's tokens."""

    beta: float = 0.1
    """β: the per-token loss scale ``β/α_t`` (the released ``beta``) and the scale of the logged implicit rewards."""
    adaptive: bool = True
    """Token-adaptive ``α_t = tv_scale · Σ_v |π_dpo − π_rdpo| + epsilon``; False: the constant ``alpha``."""
    tv_scale: float = 10.0
    """r of the adaptive weight (the released script's ``beta2``; its on-policy script uses 15)."""
    epsilon: float = 1e-3
    """ε of the adaptive weight: its floor where the two models agree."""
    alpha: float = 1.0
    """The constant extrapolation weight when ``adaptive`` is false."""
    responses: Literal["chosen", "both"] = "chosen"
    """Which responses are distilled: the chosen ones (the released off-policy trainer) or both, equally weighted."""
    dpo: str = "dpo"
    """Name of the DPO model in ``model.frozen_models``."""
    reverse_dpo: str = "reverse_dpo"
    """Name of the reverse-DPO model (trained on swapped pairs) in ``model.frozen_models``."""
    needs_reference: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("tv_scale", "epsilon"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"AlignDistil: {name} must be >= 0, got {getattr(self, name)}.")
        if not self.alpha > 0 or (self.adaptive and not self.epsilon > 0):
            raise ConfigError(f"AlignDistil: the extrapolation weight divides β, so it must be > 0 at every token: "
                              f"alpha = {self.alpha}, epsilon = {self.epsilon}. Fix: alpha > 0 and epsilon > 0.")
        if self.responses not in ("chosen", "both"):
            raise ConfigError(f"AlignDistil: responses must be 'chosen' or 'both', got {self.responses!r}.")
        if self.dpo == self.reverse_dpo:
            raise ConfigError(f"AlignDistil: dpo and reverse_dpo name the same frozen model ({self.dpo!r}); the "
                              "teacher contrasts two different models. Fix: model.frozen_models: {dpo: <path>, "
                              "reverse_dpo: <path>}.")

    def distribution_statistics(self) -> dict[str, DistributionStatistic]:
        return {STATISTIC: TeacherDivergence(self.dpo, self.reverse_dpo, self.beta, self.adaptive, self.tv_scale,
                                             self.epsilon, self.alpha)}

    def __call__(self, stats: TokenStats, masks: TokenMasks | None = None) -> LossOutput:
        if STATISTIC not in stats.distribution:
            raise ValueError(f"AlignDistil reads TokenStats.distribution[{STATISTIC!r}]; run it through "
                             "PreferenceModule (or distributions.distribution_stats).")
        mask = stats.response_mask
        per_row = (stats.distribution[STATISTIC] * mask).sum(-1) / mask.sum(-1).clamp_min(1)
        chosen_kl, rejected_kl = split_pairs(per_row)
        chosen, rejected = pair_sums(stats.log_ratio, mask)
        loss = chosen_kl if self.responses == "chosen" else 0.5 * (chosen_kl + rejected_kl)
        return LossOutput(loss=loss, logit=(self.beta * (chosen - rejected)).detach(),
                          chosen_reward=(self.beta * chosen).detach(), rejected_reward=(self.beta * rejected).detach(),
                          penalty=torch.zeros_like(loss))

    def metrics(self, stats: TokenStats, masks: TokenMasks | None, out: LossOutput,
                batch: PreferenceBatch) -> dict[str, Tensor]:
        """The preference metrics plus ``aligndistil/scaled_kl``: the mean of ``ℓ_t = (β/α_t) KL_t`` over the
        response tokens of the distilled responses."""
        mask = stats.response_mask
        if self.responses == "chosen":
            mask = mask & torch.arange(mask.shape[0], device=mask.device)[:, None].lt(mask.shape[0] // 2)
        kl = (stats.distribution[STATISTIC].detach() * mask).sum() / mask.sum().clamp_min(1)
        return {**preference_metrics(stats, masks, out), "aligndistil/scaled_kl": kl}
