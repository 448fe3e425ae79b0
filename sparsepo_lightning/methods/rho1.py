"""Rho-1-style token selection for preference pairs: train on the tokens with the largest excess loss.

Lin et al., *Not All Tokens Are What You Need* (Rho-1), NeurIPS 2024, arXiv 2404.07965, "Selective Language
Modeling": a token's excess loss is ``L_θ(x_i) − L_RM(x_i)`` (paper Eq. 3, there against a reference model trained
on high-quality data), and the training loss keeps the top ``k %`` of tokens of a batch by that score (Eqs. 4–5, the
indicator ``I_k%``; k = 60 % for the 1B model). The paper released no training code. Here
the reference is the frozen preference reference, so the excess loss of a response token is
``−log π_θ(y^t) + log π_ref(y^t) = −ρ^t``: the tokens the policy has moved *below* the reference the most. With
``WeightedDPO`` the loss is DPO over the kept tokens: ``−log σ(β[Σ_{t∈S_w} ρ_w^t − Σ_{t∈S_l} ρ_l^t])``.

At step 0 every ρ is 0 (policy = reference); ties are broken by position, so the first ``k %`` tokens of each
response (``scope: response``) or of the batch are kept until the policy moves. Both responses are ranked by the
same score (the literal "policy vs reference excess loss"): on the rejected side this keeps the tokens the
policy has already pushed down the most. This adaptation to pairs is this package's, not the paper's.
"""

from __future__ import annotations

from torch import Tensor

from sparsepo_lightning.masks.base import ReferenceOutputs, TokenContext, TokenMasker
from sparsepo_lightning.methods.topk import Scope, check_fraction, top_fraction
from sparsepo_lightning.types import TokenMasks


class ExcessLossSelection(TokenMasker):
    """Weight 1 on the ``keep_ratio`` share of response tokens with the largest excess loss ``−ρ^t``, 0 elsewhere.

    Args:
        keep_ratio: the kept share ``k`` of response tokens, in (0, 1] (Rho-1 keeps 60–70 %).
        scope: ``batch`` ranks all response tokens of the batch together (as Rho-1 does); ``response`` keeps
            ``k %`` of every response.
    """

    needs_reference = True
    reference_cache_fields = ("reference_logps",)  # reads only context.stats.log_ratio

    def __init__(self, keep_ratio: float = 0.6, scope: Scope = "batch") -> None:
        super().__init__()
        check_fraction(keep_ratio, "keep_ratio", "ExcessLossSelection")
        self.keep_ratio = keep_ratio
        self.scope = scope

    def forward(self, reference: ReferenceOutputs | None, response_mask: Tensor,
                context: TokenContext | None = None) -> TokenMasks:
        if context is None or context.stats is None:
            raise ValueError("ExcessLossSelection reads the step's statistics: call it with a TokenContext.")
        excess = -context.stats.log_ratio  # L_θ − L_ref per token
        kept = top_fraction(excess, response_mask, self.keep_ratio, self.scope)
        return TokenMasks(reward=kept, kl=kept)
