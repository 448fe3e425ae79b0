"""Token weights from the data: character spans annotated on each response (Dense-DPO-style span preferences).

Fine-grained preference data marks the parts of a response that make it better or worse (span annotations as in
*Fine-Grained Human Feedback* (Wu et al. 2023, arXiv 2306.01693) or the segment-level preferences of DenseDPO
(arXiv 2506.03517)). A data file carries them per response as ``chosen_spans`` / ``rejected_spans``:
``[[start, end, weight], ...]`` in characters of that response, mapped to tokens through the tokenizer's offsets
when the data is tokenised (so one file serves any tokenizer; see the README's data section). This masker turns
them into token weights: a covered token gets its span's weight, every other response token ``default``
(0: train only on annotated spans; 1: annotated spans re-weight an otherwise uniform response). With
``WeightedDPO`` the loss is ``−log σ(β[Σ_t w_w^t ρ_w^t − Σ_t w_l^t ρ_l^t])``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsepo_lightning.errors import ConfigError
from sparsepo_lightning.masks.base import ReferenceOutputs, TokenContext, TokenMasker
from sparsepo_lightning.types import TokenMasks


class SpanWeights(TokenMasker):
    """Weights from the data's span columns; ``default`` on response tokens no span covers.

    Args:
        default: weight of uncovered response tokens (and of every token of a response without spans).
        missing: what a batch without any span column does: ``error`` (default: the data has no spans, which is
            almost certainly a mistake) or ``default`` (every token gets ``default``).
    """

    needs_reference = False

    def __init__(self, default: float = 0.0, missing: str = "error") -> None:
        super().__init__()
        if missing not in ("error", "default"):
            raise ConfigError(f"SpanWeights: missing must be 'error' or 'default', got {missing!r}.")
        self.default = float(default)
        self.missing = missing

    def forward(self, reference: ReferenceOutputs | None, response_mask: Tensor,
                context: TokenContext | None = None) -> TokenMasks:
        weights, covered = (None, None) if context is None or context.batch is None else \
            context.batch.shifted_token_weights()
        if weights is None:
            if self.missing == "error":
                raise ConfigError(
                    "SpanWeights: this batch has no span weights: the data rows carry no chosen_spans/rejected_spans "
                    "column. Fix: add the columns to the data (README, data section), or set "
                    "model.masker.init_args.missing: default.")
            return _constant(response_mask, self.default)
        values = torch.where(covered, weights.float(), torch.full_like(weights, self.default, dtype=torch.float32))
        masked = values * response_mask
        return TokenMasks(reward=masked, kl=masked)


def _constant(response_mask: Tensor, value: float) -> TokenMasks:
    weights = response_mask.float() * value
    return TokenMasks(reward=weights, kl=weights)
