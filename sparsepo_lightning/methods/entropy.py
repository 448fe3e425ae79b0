"""High-entropy token selection: train on the response tokens where the model is most uncertain.

Wang et al., *Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective Reinforcement Learning for LLM
Reasoning*, arXiv 2506.01939. The token entropy at position t is

    H_t = −Σ_v π(v | x, y^{<t}) log π(v | x, y^{<t})

and the paper's policy-gradient loss (DAPO) keeps only the top ρ of the batch's tokens by ``H_t`` (an indicator
``I[H_t ≥ τ^B_ρ]``, τ^B_ρ the batch's ρ-quantile of entropy; ρ = 20 %). Here the selection is a token mask, and with
``WeightedDPO`` the loss is DPO over the kept tokens: ``−log σ(β[Σ_{t∈S_w} ρ_w^t − Σ_{t∈S_l} ρ_l^t])``. The paper
is on-policy RL with verifiable rewards; this adaptation to preference pairs is this package's, not the paper's.

Whose entropy: the **policy's** by default, as in the paper (the entropy of the policy being trained, recomputed
every step on the tokens of the batch), so the selection follows the policy as it moves; ``model: reference``
uses the frozen reference's instead, a selection fixed for the whole run (the paper reports that the high-entropy
positions of the trained model largely coincide with those of the base model; with a frozen selection that
claim becomes an ablation one can run). The entropy comes from the full-vocabulary distribution at every response
position, computed in the fused chunked pass (``distributions.Entropy``), and carries no gradient into the mask.
"""

from __future__ import annotations

from torch import Tensor

from sparsepo_lightning.distributions import Entropy
from sparsepo_lightning.errors import ConfigError
from sparsepo_lightning.masks.base import ReferenceOutputs, TokenContext, TokenMasker
from sparsepo_lightning.methods.topk import Scope, check_fraction, top_fraction
from sparsepo_lightning.types import TokenMasks


class HighEntropySelection(TokenMasker):
    """Weight 1 on the ``keep_ratio`` share of response tokens with the highest entropy ``H_t``, 0 elsewhere.

    Args:
        keep_ratio: the kept share ρ of response tokens, in (0, 1] (paper: 0.2).
        scope: ``batch`` ranks all response tokens of the batch together (as the paper does); ``response`` keeps
            ρ of every response.
        model: whose entropy: ``policy`` (the paper's) or ``reference`` (a fixed selection).
    """

    def __init__(self, keep_ratio: float = 0.2, scope: Scope = "batch", model: str = "policy") -> None:
        super().__init__()
        check_fraction(keep_ratio, "keep_ratio", "HighEntropySelection")
        if model not in ("policy", "reference"):
            raise ConfigError(f"HighEntropySelection: model must be 'policy' or 'reference', got {model!r}.")
        self.keep_ratio, self.scope, self.model = keep_ratio, scope, model
        self.needs_reference = model == "reference"
        self.statistic = f"entropy_{model}"

    def distribution_statistics(self) -> dict[str, Entropy]:
        return {self.statistic: Entropy(self.model)}

    def forward(self, reference: ReferenceOutputs | None, response_mask: Tensor,
                context: TokenContext | None = None) -> TokenMasks:
        if context is None or context.stats is None or self.statistic not in context.stats.distribution:
            raise ValueError(f"HighEntropySelection reads the {self.model}'s token entropy from "
                             "context.stats.distribution; run it through PreferenceModule (or pass a TokenContext "
                             f"whose stats.distribution holds {self.statistic!r}).")
        kept = top_fraction(context.stats.distribution[self.statistic], response_mask, self.keep_ratio, self.scope)
        return TokenMasks(reward=kept, kl=kept)
