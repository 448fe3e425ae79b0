"""TIS-DPO: token importance weights from the log-ratio of two contrastive models.

Liu et al., *TIS-DPO: Token-level Importance Sampling for Direct Preference Optimization with Estimated Weights*,
ICLR 2025, arXiv 2410.04350. Two frozen models, a "positive" π⁺ and a "negative" π⁻ (the paper's best variant: a
DPO model and a reverse-DPO model trained on swapped pairs; SFT on chosen-only / rejected-only data, or one model
with a positive / negative system prompt also work), give every response token ``d^t = log π⁺(y^t) − log π⁻(y^t)``.

- ``weights: paper`` (the paper's weight estimate, §5): ``w^t = k · exp(μ · clamp(d^t, L, U))`` with ``μ = +1`` on
  the chosen and ``μ = −1`` on the rejected response, ``L = −0.5``, ``U = 1.5``, ``k = 1``;
- ``weights: rank`` (what the released code, github.com/exlaw/TIS-DPO at cbad7c1, trains with: ``rank_based``): per
  response, the scores (``d`` on the chosen, ``−d`` on the rejected response) are ranked and mapped linearly onto
  [0.7, 1.3] (lowest score 0.7, highest 1.3; a one-token response gets 1.0). Equal scores rank in position order,
  the earlier token lower, as the released code's stable ascending sort does.

The last token of each response (the EOS the tokenizer appends; the last kept token of a truncated response) gets
weight ``eos_weight`` = 0 and takes no part in the ranking, as in the released code (``tokenize_batch_element``
gives it 0 whatever the weight transform); ``eos_weight: null`` weights it like any other token (the paper's
formula, which does not single it out).

The loss is the token-weighted DPO of the paper with its KL term off, as in the released default
(``WeightedDPO``: ``−log σ(β[Σ w_w ρ_w − Σ w_l ρ_l])``, β = 0.1). The optional sequential-KL term η of the paper
uses KL(π_θ‖π_ref), the reverse of the KL this package computes; it is not offered.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from sparsepo_lightning.errors import ConfigError
from sparsepo_lightning.masks.base import ReferenceOutputs, TokenContext, TokenMasker
from sparsepo_lightning.methods.topk import last_response_token, rank_within, rejected_rows
from sparsepo_lightning.types import TokenMasks


class ContrastiveImportance(TokenMasker):
    """TIS-DPO token weights from two frozen contrastive models named in ``model.frozen_models``.

    Args:
        positive: name of the positive model π⁺ in ``model.frozen_models``.
        negative: name of the negative model π⁻.
        weights: ``paper`` (exp of the clamped log-ratio) or ``rank`` (the released code's rank map onto [0.7, 1.3]).
        low: L, lower clamp of ``d`` (``paper``). high: U, upper clamp. scale: k.
        eos_weight: weight of each response's last token (0: the released code); None computes it like the others.
    """

    needs_reference = False

    def __init__(self, positive: str = "positive", negative: str = "negative",
                 weights: Literal["paper", "rank"] = "paper", low: float = -0.5, high: float = 1.5,
                 scale: float = 1.0, eos_weight: float | None = 0.0) -> None:
        super().__init__()
        if weights not in ("paper", "rank"):
            raise ConfigError(f"ContrastiveImportance: weights must be 'paper' or 'rank', got {weights!r}.")
        if not low < high:
            raise ConfigError(f"ContrastiveImportance: need low < high, got low={low}, high={high}.")
        self.positive, self.negative, self.weights = positive, negative, weights
        self.low, self.high, self.scale, self.eos_weight = low, high, scale, eos_weight

    def frozen_model_names(self) -> tuple[str, ...]:
        return (self.positive, self.negative)

    def forward(self, reference: ReferenceOutputs | None, response_mask: Tensor,
                context: TokenContext | None = None) -> TokenMasks:
        if context is None or not {self.positive, self.negative} <= context.frozen.keys():
            raise ValueError("ContrastiveImportance reads the frozen models "
                             f"{self.positive!r} and {self.negative!r}: call it with a TokenContext that has them.")
        d = context.frozen[self.positive].logps - context.frozen[self.negative].logps  # (2B, T-1)
        sign = torch.where(rejected_rows(d), -1.0, 1.0)  # μ = +1 on chosen rows, −1 on rejected rows
        eos = last_response_token(response_mask) if self.eos_weight is not None else torch.zeros_like(response_mask)
        if self.weights == "paper":
            w = self.scale * torch.exp(sign * d.clamp(self.low, self.high))
        else:
            w = rank_map(sign * d, response_mask & ~eos)
        w = torch.where(eos, self.eos_weight or 0.0, w) * response_mask
        return TokenMasks(reward=w, kl=w)


def rank_map(scores: Tensor, mask: Tensor, lowest: float = 0.7, highest: float = 1.3) -> Tensor:
    """Per row, the masked scores' ascending ranks mapped linearly onto [lowest, highest]; 1.0 for one-token rows.

    Equal scores rank in position order, the earlier lower (the released code's stable ascending sort)."""
    count = mask.sum(-1, keepdim=True)  # (N, 1)
    ascending = rank_within(-scores, mask).float()  # descending rank of −score, ties earlier first
    spread = (count - 1).clamp(min=1).float()
    mapped = lowest + (highest - lowest) * ascending / spread
    return torch.where(count > 1, mapped, torch.ones_like(mapped)) * mask
