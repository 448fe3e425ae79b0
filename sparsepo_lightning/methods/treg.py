"""T-REG: DPO plus a token-level reward regulariser whose token rewards come from contrastive prompting.

Zhou et al., *T-REG: Preference Optimization with Token-Level Reward Regularization*, ACL 2025, arXiv 2412.02685 §3
(the authors' code, github.com/wzhouad/T-REG, could not be consulted offline; the formulas follow the paper's text).
The same response ``y`` is scored under two revisions of its prompt ("opposite" prompting): ``x_better`` asks for a
better response, ``x_worse`` for a worse one. Per response token ``t`` and pair ``(y_w, y_l)``:

    r̂_t     = σ( log π_ref(y_t | x_better, y_<t) − log π_ref(y_t | x_worse, y_<t) ) − 0.5     ∈ [−0.5, 0.5]
    L_reg(y) = − Σ_t β · r̂_t · log π_θ(y_t | x, y_<t)                    (sum over the response's tokens)
    w        = σ( −β (Σ_t ρ_w^t − Σ_t ρ_l^t) ) = σ(r_DPO(y_l) − r_DPO(y_w))      ρ^t = log π_θ/π_ref
    L        = −log σ( β (Σ_t ρ_w^t − Σ_t ρ_l^t) )  +  α · w · (L_reg(y_w) + L_reg(y_l))

``L_reg`` is a token-weighted language-model loss: tokens the "better" prompt prefers (``r̂_t > 0``) have their
likelihood raised, tokens the "worse" prompt prefers lowered, in either response. ``w`` is large when the pair is
mis-ranked by the policy's own DPO reward, so the regulariser acts most where DPO is wrong.

Choices where the paper leaves room (stated here and in docs/treg.md):

- **Scorer** (``scorer``): ``reference`` (default): ``r̂`` is scored by the frozen reference π_ref, so it is a fixed
  target per pair; ``policy``: by the current policy, without gradient (it then moves with training). Either way no
  gradient flows into ``r̂``: the scoring forward passes run under ``no_grad``.
- **Reduction**: ``L_reg`` sums over the response's tokens (the paper writes a sum over ``t``), not a mean; pairs are
  averaged by the module like every objective's per-pair loss.
- **Sequence weight** ``w``: detached (a weight, stop-gradient); the gradient of the regulariser reaches the policy
  only through ``log π_θ(y_t | x, y_<t)``.
- **Defaults**: β = 0.1; α = 0.25 (the middle of the paper's search grid {0.1, 0.25, 0.5}).
- **Templates**: revision-style instructions asking for a helpful, correct, coherent and concise (better) or an
  unhelpful, incorrect, incoherent and verbose (worse) response, placed before the prompt (so a prompt that ends with
  an assistant cue keeps it). The exact released wording was not available offline; override with
  ``better_template`` / ``worse_template``. Chat rows get the instruction inside their last user message.

Worked by hand (β = 0.5, α = 0.5, one pair; ``tests/test_treg.py::test_treg_loss_by_hand``): better/worse log-probs
−1/−2 give ``r̂ = σ(1) − 0.5 = 0.2310586``; with chosen ``log π_θ = (−1, −2)``, ``r̂ = (0.2310586, −0.1224593)``:
``L_reg(y_w) = −0.5 · (0.2310586·(−1) + (−0.1224593)·(−2)) = −0.0069300``; rejected ``log π_θ = (−1.5, −0.5, −1)``,
``r̂ = (−0.2310586, 0, 0.2310586)``: ``L_reg(y_l) = −0.0577646``; ``Σρ_w = −0.2``, ``Σρ_l = 0.2``: DPO logit −0.2,
``L_DPO = log(1 + e^0.2) = 0.7981389``, ``w = σ(0.2) = 0.5498340``;
``L = 0.7981389 + 0.5 · 0.5498340 · (−0.0646947) = 0.7803532``.

The variant prompts cost two extra no-grad forward passes of the scorer over 2B rows per step (counted in
``data.max_tokens``), in either layout (packed: each variant packed on its own, its prompt the shared prefix).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsepo_lightning.errors import ConfigError
from sparsepo_lightning.losses import pair_sums, split_pairs
from sparsepo_lightning.metrics import preference_metrics
from sparsepo_lightning.objectives import Objective
from sparsepo_lightning.prompt_variants import SCORERS, check_templates
from sparsepo_lightning.types import LossOutput, PreferenceBatch, TokenMasks, TokenStats

BETTER, WORSE = "treg_better", "treg_worse"
"""Names of the two prompt variants in ``TokenStats.variant_logps`` and ``PreferenceBatch.prompt_variants``."""
BETTER_TEMPLATE = ("Revise your answer to the request below so that it is helpful, correct, coherent and concise.\n\n"
                   "{prompt}")
WORSE_TEMPLATE = ("Revise your answer to the request below so that it is unhelpful, incorrect, incoherent and "
                  "verbose.\n\n{prompt}")


def token_rewards(stats: TokenStats) -> Tensor:
    """``r̂_t = σ(log π(y_t|x_better) − log π(y_t|x_worse)) − 0.5``, ``(2B, T-1)`` float32 in ``[−0.5, 0.5]``, 0
    outside the response, detached."""
    if not {BETTER, WORSE} <= stats.variant_logps.keys():
        raise ValueError(f"T-REG reads TokenStats.variant_logps[{BETTER!r}] and [{WORSE!r}]; run it through "
                         "PreferenceModule with PreferenceDataModule (which add the contrastive prompts).")
    diff = stats.variant_logps[BETTER].detach().float() - stats.variant_logps[WORSE].detach().float()
    return (torch.sigmoid(diff) - 0.5) * stats.response_mask


def treg_terms(stats: TokenStats, beta: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(logit, w, L_reg(y_w), L_reg(y_l))`` per pair, each ``(B,)`` float32 (module docstring): the DPO logit
    ``β(Σρ_w − Σρ_l)`` (with gradient), the detached weight ``w = σ(−logit)`` and the two regularisers
    ``−Σ_t β r̂_t log π_θ`` (gradient through ``log π_θ`` only)."""
    mask = stats.response_mask
    chosen, rejected = pair_sums(stats.log_ratio.float(), mask)
    logit = beta * (chosen - rejected)
    reg_chosen, reg_rejected = pair_sums(stats.policy_logps.float(), mask, -beta * token_rewards(stats))
    return logit, torch.sigmoid(-logit).detach(), reg_chosen, reg_rejected


@dataclass
class TREG(Objective):
    """T-REG (module docstring): sigmoid DPO plus ``α · w · (L_reg(y_w) + L_reg(y_l))``, token rewards ``r̂`` from
    the contrastive prompts ``treg_better`` / ``treg_worse`` scored by the frozen reference (or the policy).

    Declares the two prompt variants; the data module renders them and the step scores the responses under them with
    the model ``scorer`` names, without gradient.
    """

    beta: float = 0.1
    """β of the DPO loss, of the DPO reward in ``w`` and of the regulariser ``−Σ β r̂_t log π_θ``."""
    alpha: float = 0.25
    """Weight α of the regulariser (0: plain DPO); the paper searches {0.1, 0.25, 0.5}."""
    scorer: Literal["reference", "policy"] = "reference"
    """The model that scores the contrastive prompts: the frozen reference (the paper) or the current policy."""
    better_template: str = BETTER_TEMPLATE
    """The prompt asking for a better response; one ``{prompt}`` placeholder."""
    worse_template: str = WORSE_TEMPLATE
    """The prompt asking for a worse response; one ``{prompt}`` placeholder."""
    needs_reference: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.alpha >= 0:
            raise ConfigError(f"TREG: alpha must be >= 0, got {self.alpha}. Fix: alpha: 0.25 (0 is plain DPO).")
        if self.scorer not in SCORERS:
            raise ConfigError(f"TREG: scorer must be one of {', '.join(SCORERS)}, got {self.scorer!r}. Fix: "
                              "scorer: reference (the paper) or scorer: policy.")
        check_templates(self.prompt_variants(), "TREG")
        if self.better_template == self.worse_template:
            raise ConfigError("TREG: better_template and worse_template are the same, so every token reward is 0. "
                              "Fix: make them ask for a better and a worse response.")

    def prompt_variants(self) -> dict[str, str]:
        """The contrastive prompts, by name (``prompt_variants.py``)."""
        return {BETTER: self.better_template, WORSE: self.worse_template}

    def prompt_variant_scorer(self) -> str:
        """The model that scores the prompt variants (``prompt_variants.declared_scorers``)."""
        return self.scorer

    def __call__(self, stats: TokenStats, masks: TokenMasks | None = None) -> LossOutput:
        stats.require("reference_logps", by="TREG")
        logit, weight, reg_chosen, reg_rejected = treg_terms(stats, self.beta)
        loss = -F.logsigmoid(logit) + self.alpha * weight * (reg_chosen + reg_rejected)
        chosen_reward, rejected_reward = pair_sums(self.beta * stats.log_ratio.detach().float(), stats.response_mask)
        return LossOutput(loss=loss, logit=logit.detach(), chosen_reward=chosen_reward,
                          rejected_reward=rejected_reward, penalty=torch.zeros_like(loss))

    def metrics(self, stats: TokenStats, masks: TokenMasks | None, out: LossOutput,
                batch: PreferenceBatch) -> dict[str, Tensor]:
        """The preference metrics plus ``treg/token_reward_chosen`` / ``_rejected`` (mean ``r̂_t`` over chosen /
        rejected response tokens: chosen above rejected when the contrastive prompts agree with the labels),
        ``treg/sequence_weight`` (mean ``w``) and ``treg/regulariser`` (mean ``w·(L_reg(y_w) + L_reg(y_l))``,
        before α)."""
        rewards = token_rewards(stats)
        chosen_r, rejected_r = split_pairs(rewards)
        chosen_m, rejected_m = split_pairs(stats.response_mask)
        with torch.no_grad():
            _, weight, reg_chosen, reg_rejected = treg_terms(stats, self.beta)
        return {**preference_metrics(stats, masks, out),
                "treg/token_reward_chosen": chosen_r.sum() / chosen_m.sum().clamp_min(1),
                "treg/token_reward_rejected": rejected_r.sum() / rejected_m.sum().clamp_min(1),
                "treg/sequence_weight": weight.mean(),
                "treg/regulariser": (weight * (reg_chosen + reg_rejected)).mean()}
