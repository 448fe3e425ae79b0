"""TGDPO: per-token β inside the Bradley–Terry term, from a token reward of a DPO-trained model.

Zhu et al., *TGDPO: Harnessing Token-Level Reward Guidance for Enhancing Direct Preference Optimization*, ICML 2025,
arXiv 2506.14574; released code github.com/dvlab-research/TGDPO at dd88982 (``train/tgdpo/trainer.py``). A frozen
DPO-trained model π_r gives the token reward ``r̂^t = β (log π_r(y^t) − log π_ref(y^t))`` (against the policy's own
reference, with the policy's β), and the loss scales each token's log-ratio by its own β:

    −log σ( Σ_t β(1 + α r̂_w^t) ρ_w^t − Σ_t β(1 − α r̂_l^t) ρ_l^t )

(no clipping in the paper or the code; α = 0.5, β = 0.1 in the released config). With ``WeightedDPO`` the masker
returns ``1 + α r̂`` on chosen and ``1 − α r̂`` on rejected tokens (the per-token β divided by β). The β inside
``r̂`` is the objective's (``PreferenceModule`` hands it over at start; a different explicit ``beta`` is a start-up
error, since it would scale ``r̂`` differently from the loss).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsepo_lightning.errors import ConfigError
from sparsepo_lightning.masks.base import ReferenceOutputs, TokenContext, TokenMasker
from sparsepo_lightning.methods.topk import rejected_rows
from sparsepo_lightning.objectives import Objective
from sparsepo_lightning.types import TokenMasks


class TokenRewardBeta(TokenMasker):
    """Per-token β factors ``1 ± α r̂^t`` from a frozen DPO model named in ``model.frozen_models``.

    Args:
        reward_model: name of π_r in ``model.frozen_models``.
        alpha: α, strength of the guidance.
        beta: the β inside ``r̂``; None (default) takes the objective's β at start (``use_objective``), as the
            released code does. A value that differs from the objective's is refused there.
    """

    reference_cache_fields = ("reference_logps",)  # reads only context.stats.reference_logps

    def __init__(self, reward_model: str = "reward", alpha: float = 0.5, beta: float | None = None) -> None:
        super().__init__()
        self.reward_model, self.alpha, self.beta = reward_model, alpha, beta

    def use_objective(self, objective: Objective) -> None:
        objective_beta = objective.beta
        if self.beta is not None and self.beta != objective_beta:
            raise ConfigError(f"model.masker.init_args.beta={self.beta} differs from the objective's beta="
                              f"{objective_beta}: TGDPO's r̂ uses the loss's β. Fix: remove the masker's beta (it "
                              "takes the objective's), or set both to the same value.")
        self.beta = objective_beta

    def frozen_model_names(self) -> tuple[str, ...]:
        return (self.reward_model,)

    def forward(self, reference: ReferenceOutputs | None, response_mask: Tensor,
                context: TokenContext | None = None) -> TokenMasks:
        if context is None or context.stats is None or self.reward_model not in context.frozen:
            raise ValueError(f"TokenRewardBeta reads the frozen model {self.reward_model!r} and the reference "
                             "log-probs: call it with a TokenContext that has them.")
        context.stats.require("reference_logps", by="TokenRewardBeta")
        if self.beta is None:
            raise ValueError("TokenRewardBeta.beta is unset: pass beta, or call use_objective(objective) first.")
        reward = self.beta * (context.frozen[self.reward_model].logps - context.stats.reference_logps)
        factor = torch.where(rejected_rows(reward), 1.0 - self.alpha * reward, 1.0 + self.alpha * reward)
        factor = factor * response_mask
        return TokenMasks(reward=factor, kl=factor)
