"""T-REG: DPO regularised by token-level rewards the policy gives itself through contrastive prompts.

Zhou et al., *T-REG: Preference Optimization with Token-Level Reward Regularization*, ACL 2025, arXiv 2412.02685.
Token rewards come from prompting the model twice with revised prompts, one asking for a good answer (``x⁺``) and
one for a bad answer (``x⁻``), and scoring the same response under both:

    r^t = log π(y^t | x⁺, y^<t) − log π(y^t | x⁻, y^<t)

Choices where the paper leaves room or we could not check it against the paper while writing this (stated here and in
docs/treg.md):

- **Which model scores** ``r^t``: the current policy, without gradient (the paper's "self-generated" rewards; its
  released code scores with the policy being trained under no_grad). ``r`` therefore moves as the policy learns.
- **Weights** per response (length ``L``, sign ``s = +1`` for chosen, ``−1`` for rejected, temperature ``τ``):
  ``w^t = L · softmax_t(s · r^t / τ)``: mean 1 over the response, large where the token is most "better-prompt"
  (chosen) or most "worse-prompt" (rejected). Treated as constants.
- **Loss** (per pair, ``ρ^t = log π_θ/π_ref``)::

      L = −log σ(β[Σ_t ρ_w^t − Σ_t ρ_l^t])  +  α · (−log σ(β[Σ_t w_w^t ρ_w^t − Σ_t w_l^t ρ_l^t]))

  the sequence-level DPO loss plus α times the same loss with token-weighted log-ratios (the paper's ``L_REG``).
  With ``α = 0`` it is DPO exactly; with ``r ≡ 0`` every weight is 1 and ``L = (1 + α)·L_DPO``.
- **Prompt templates**: ours (one ``{prompt}`` placeholder, instruction placed before the prompt so a prompt that
  ends with an assistant cue keeps it); the paper's exact wording is not reproduced. Override with ``better_template``
  / ``worse_template``. Chat rows get the instruction inside their last user message (``prompt_variants.py``).

The two variant prompts cost two extra no-grad policy forward passes over 2B rows per step (counted in
``data.max_tokens``), in either layout (packed: each variant packed on its own, its prompt the shared prefix).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsepo_lightning.errors import ConfigError
from sparsepo_lightning.losses import pair_sums, split_pairs
from sparsepo_lightning.metrics import preference_metrics
from sparsepo_lightning.objectives import Objective
from sparsepo_lightning.prompt_variants import check_templates
from sparsepo_lightning.types import LossOutput, PreferenceBatch, TokenMasks, TokenStats

BETTER, WORSE = "treg_better", "treg_worse"
"""Names of the two prompt variants in ``TokenStats.variant_logps`` and ``PreferenceBatch.prompt_variants``."""
BETTER_TEMPLATE = ("Give the best possible answer to the request below: helpful, correct, honest and harmless.\n\n"
                   "{prompt}")
WORSE_TEMPLATE = ("Give a bad answer to the request below: unhelpful, incorrect, dishonest or harmful.\n\n"
                  "{prompt}")


def token_rewards(stats: TokenStats) -> Tensor:
    """``r^t = log π(y^t|x⁺) − log π(y^t|x⁻)``, ``(2B, T-1)`` float32, 0 outside the response."""
    if not {BETTER, WORSE} <= stats.variant_logps.keys():
        raise ValueError(f"T-REG reads TokenStats.variant_logps[{BETTER!r}] and [{WORSE!r}]; run it through "
                         "PreferenceModule with PreferenceDataModule (which add the contrastive prompts).")
    return (stats.variant_logps[BETTER].float() - stats.variant_logps[WORSE].float()) * stats.response_mask


def token_weights(rewards: Tensor, response_mask: Tensor, temperature: float = 1.0) -> Tensor:
    """``w^t = L · softmax_t(s · r^t / τ)`` over each row's response tokens (``s = +1`` on the first B rows, the
    chosen ones, ``−1`` on the rejected), ``(2B, T-1)`` float32, 0 outside the response and on empty rows."""
    sign = torch.ones(rewards.shape[0], 1, device=rewards.device)
    sign[rewards.shape[0] // 2:] = -1.0
    logits = (sign * rewards.float() / temperature).masked_fill(~response_mask, float("-inf"))
    length = response_mask.sum(-1, keepdim=True)
    soft = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # an empty row is all -inf: NaN, set to 0
    return length * soft * response_mask


@dataclass
class TREG(Objective):
    """T-REG: DPO plus ``α`` times a DPO loss on token-weighted log-ratios, weights from contrastive prompts.

    Declares the prompt variants ``treg_better`` and ``treg_worse``; the data module renders them and the step scores
    the responses under them with the policy (no gradient). Formula and choices: module docstring.
    """

    beta: float = 0.1
    """β of both DPO terms."""
    alpha: float = 1.0
    """Weight of the token-level regulariser (0: plain DPO)."""
    temperature: float = 1.0
    """τ of the softmax that turns token rewards into weights (> 0; large: weights → 1)."""
    better_template: str = BETTER_TEMPLATE
    """The prompt asking for a good answer; one ``{prompt}`` placeholder."""
    worse_template: str = WORSE_TEMPLATE
    """The prompt asking for a bad answer; one ``{prompt}`` placeholder."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.alpha >= 0:
            raise ConfigError(f"TREG: alpha must be >= 0, got {self.alpha}.")
        if not self.temperature > 0:
            raise ConfigError(f"TREG: temperature must be > 0, got {self.temperature}.")
        check_templates(self.prompt_variants(), "TREG")
        if self.better_template == self.worse_template:
            raise ConfigError("TREG: better_template and worse_template are the same, so every token reward is 0. "
                              "Fix: make them ask for a good and a bad answer.")

    def prompt_variants(self) -> dict[str, str]:
        """The contrastive prompts, by name (``prompt_variants.py``)."""
        return {BETTER: self.better_template, WORSE: self.worse_template}

    def __call__(self, stats: TokenStats, masks: TokenMasks | None = None) -> LossOutput:
        mask = stats.response_mask
        weights = token_weights(token_rewards(stats), mask, self.temperature)
        log_ratio = stats.log_ratio
        chosen, rejected = pair_sums(log_ratio, mask)
        logit = self.beta * (chosen - rejected)
        weighted_chosen, weighted_rejected = pair_sums(log_ratio, mask, weights)
        regulariser = -F.logsigmoid(self.beta * (weighted_chosen - weighted_rejected))
        loss = -F.logsigmoid(logit) + self.alpha * regulariser
        return LossOutput(loss=loss, logit=logit.detach(), chosen_reward=(self.beta * chosen).detach(),
                          rejected_reward=(self.beta * rejected).detach(), penalty=torch.zeros_like(loss))

    def metrics(self, stats: TokenStats, masks: TokenMasks | None, out: LossOutput,
                batch: PreferenceBatch) -> dict[str, Tensor]:
        """The preference metrics plus ``treg/token_reward_chosen`` / ``_rejected``: the mean token reward ``r^t``
        over chosen / rejected response tokens (chosen above rejected when the contrastive prompts agree with the
        labels)."""
        rewards = token_rewards(stats).detach()
        chosen_r, rejected_r = split_pairs(rewards)
        chosen_m, rejected_m = split_pairs(stats.response_mask)
        return {**preference_metrics(stats, masks, out),
                "treg/token_reward_chosen": chosen_r.sum() / chosen_m.sum().clamp_min(1),
                "treg/token_reward_rejected": rejected_r.sum() / rejected_m.sum().clamp_min(1)}
