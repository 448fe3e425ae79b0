"""ConfPO: preference optimisation on the tokens the policy is least confident about.

Yoon et al., *ConfPO: Exploiting Policy Model Confidence for Critical Token Selection in Preference Optimization*,
ICML 2025, arXiv 2506.08712; released code github.com/hee-suk-yoon/ConfPO at 044b366
(``trl/trainer/cpo_trainer.py``, ``cpo_loss_confpo``). A response token is selected when the policy's probability of
it is below the response's mean token probability, ``π_θ(y^t) < τ = (1/|y|) Σ_s π_θ(y^s)`` (arithmetic mean of
probabilities, strict ``<``, recomputed every step from the current policy, no gradient through the selection).
The loss is SimPO's on the selected tokens only (``MaskedSimPO``: ``−log σ(β(ℓ̄_w − ℓ̄_l) − γ)``, β = 1.5,
γ = 1.6 in the released run); no reference model and no extra model.
"""

from __future__ import annotations

from torch import Tensor

from sparsepo_lightning.masks.base import ReferenceOutputs, TokenContext, TokenMasker
from sparsepo_lightning.types import TokenMasks


class LowConfidenceSelection(TokenMasker):
    """Weight 1 on response tokens whose policy probability is below the response's mean token probability."""

    needs_reference = False

    def forward(self, reference: ReferenceOutputs | None, response_mask: Tensor,
                context: TokenContext | None = None) -> TokenMasks:
        if context is None or context.stats is None:
            raise ValueError("LowConfidenceSelection reads the policy's log-probs: call it with a TokenContext.")
        probs = context.stats.policy_logps.float().exp() * response_mask  # (2B, T-1), 0 off the response
        mean = probs.sum(-1, keepdim=True) / response_mask.sum(-1, keepdim=True).clamp(min=1)
        selected = ((probs < mean) & response_mask).float()
        return TokenMasks(reward=selected, kl=selected)
