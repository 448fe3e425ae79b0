"""SePO: an oracle scores every token; train reference-free on the top tokens of the chosen response and the bottom
tokens of the rejected one.

Yang et al., *Selective Preference Optimization via Token-Level Reward Function Estimation*, arXiv 2408.13518;
released code github.com/SteveKGYang/SePO at 82fab6c. A small oracle pair, ``oracle`` π_ora (DPO-trained) and
``oracle_reference`` (its SFT starting point), scores a token by ``s^t = log π_ora(y^t) − log π_ora_ref(y^t)``; the
chosen response keeps its top ``k %`` tokens by ``s``, the rejected response its bottom ``k %`` (per response,
k = 30 %). The oracle must share the policy's tokenizer. The loss is reference-free on the mean log-prob of the
kept tokens (``MaskedSimPO``: ``−log σ(γ(ℓ̄_w − ℓ̄_l) − λ)``, paper γ = 2.1, λ = 0.5; the released code has
γ = 1, λ = 0). Kept counts are ``ceil(k·|y|)`` (at least one token; the released code floors).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsepo_lightning.masks.base import ReferenceOutputs, TokenContext, TokenMasker
from sparsepo_lightning.methods.topk import check_fraction, rejected_rows, top_fraction
from sparsepo_lightning.types import TokenMasks


class OracleSelection(TokenMasker):
    """SePO selection from two frozen oracle models named in ``model.frozen_models``.

    Args:
        oracle: name of π_ora. oracle_reference: name of the oracle's reference.
        keep_ratio: k, the kept share of each response's tokens.
    """

    needs_reference = False

    def __init__(self, oracle: str = "oracle", oracle_reference: str = "oracle_reference",
                 keep_ratio: float = 0.3) -> None:
        super().__init__()
        check_fraction(keep_ratio, "keep_ratio", "OracleSelection")
        self.oracle, self.oracle_reference, self.keep_ratio = oracle, oracle_reference, keep_ratio

    def frozen_model_names(self) -> tuple[str, ...]:
        return (self.oracle, self.oracle_reference)

    def forward(self, reference: ReferenceOutputs | None, response_mask: Tensor,
                context: TokenContext | None = None) -> TokenMasks:
        if context is None or not {self.oracle, self.oracle_reference} <= context.frozen.keys():
            raise ValueError(f"OracleSelection reads the frozen models {self.oracle!r} and {self.oracle_reference!r}: "
                             "call it with a TokenContext that has them.")
        score = context.frozen[self.oracle].logps - context.frozen[self.oracle_reference].logps
        signed = torch.where(rejected_rows(score), -score, score)  # bottom k % of the rejected = top k % of −s
        kept = top_fraction(signed, response_mask, self.keep_ratio, "response")
        return TokenMasks(reward=kept, kl=kept)
