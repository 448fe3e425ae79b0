"""cDPO / critical tokens: down-weight nothing on the chosen side, weight each rejected token by how critical it is.

Lin et al., *Critical Tokens Matter: Token-Level Contrastive Estimation Enhances LLM's Reasoning Capability*,
ICML 2025, arXiv 2411.19943; released code github.com/chenzhiling9954/Critical-Tokens-Matter at 228991e. Two frozen
models, ``positive`` P_p (fine-tuned on correct trajectories) and ``negative`` P_n (on incorrect ones), give the
contrastive estimate (paper Eq. 1)

    s^t = softmax((1 + β_ce) z_p − β_ce z_n)[y^t]        (z: the models' logits at that position)

where a low ``s^t`` marks a critical token. The rejected response's per-token log-ratios are weighted by
``1 − s^t`` and the chosen response's by 1 (the paper's loss; the released default ``only_neg``), or by ``s^t``
with ``only_rejected: false`` (the code's other option). With ``WeightedDPO``:
``−log σ(γ[Σ ρ_w − Σ (1 − s_l) ρ_l])`` (paper γ = 1.0; the released config uses 0.1).

The last token of each response (the EOS the tokenizer appends) gets weight ``eos_weight`` = 1 on both sides, as in
the released code (``dpo_loss`` pads the estimates with ``[1]`` on the chosen and ``1 − [0]`` on the rejected
side); ``eos_weight: null`` computes it from ``s^t`` like any other token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsepo_lightning.errors import ConfigError
from sparsepo_lightning.logprobs import chunk_starts
from sparsepo_lightning.masks.base import FrozenModelOutputs, ReferenceOutputs, TokenContext, TokenMasker
from sparsepo_lightning.methods.topk import last_response_token, rejected_rows
from sparsepo_lightning.types import TokenMasks, scatter_response


class CriticalTokenWeights(TokenMasker):
    """cDPO weights from two frozen models named in ``model.frozen_models`` (full distributions, chunked).

    Args:
        positive: name of P_p in ``model.frozen_models``. negative: name of P_n.
        beta_ce: β of the contrastive estimate (paper and code: 1.0).
        only_rejected: chosen tokens get weight 1 (default); False weights them by ``s^t``.
        chunk_size: response tokens per LM-head call (memory ``O(chunk_size · V)``).
        eos_weight: weight of each response's last token (1: the released code); None computes it from ``s^t``.
    """

    needs_reference = False

    def __init__(self, positive: str = "positive", negative: str = "negative", beta_ce: float = 1.0,
                 only_rejected: bool = True, chunk_size: int = 1024, eos_weight: float | None = 1.0) -> None:
        super().__init__()
        if beta_ce < 0:
            raise ConfigError(f"CriticalTokenWeights: beta_ce must be >= 0, got {beta_ce}.")
        self.positive, self.negative = positive, negative
        self.beta_ce, self.only_rejected, self.chunk_size = beta_ce, only_rejected, chunk_size
        self.eos_weight = eos_weight

    def frozen_model_names(self) -> tuple[str, ...]:
        return (self.positive, self.negative)

    def forward(self, reference: ReferenceOutputs | None, response_mask: Tensor,
                context: TokenContext | None = None) -> TokenMasks:
        if context is None or context.batch is None or not {self.positive, self.negative} <= context.frozen.keys():
            raise ValueError("CriticalTokenWeights reads the frozen models "
                             f"{self.positive!r} and {self.negative!r} and the batch: call it with a TokenContext.")
        labels, _ = context.batch.shifted_labels()
        s = contrastive_probability(context.frozen[self.positive], context.frozen[self.negative], labels,
                                    response_mask, self.beta_ce, self.chunk_size)
        chosen_weight = torch.ones_like(s) if self.only_rejected else s
        w = torch.where(rejected_rows(s), 1.0 - s, chosen_weight)
        if self.eos_weight is not None:
            w = torch.where(last_response_token(response_mask), self.eos_weight, w)
        w = w * response_mask
        return TokenMasks(reward=w, kl=w)


def contrastive_probability(positive: FrozenModelOutputs, negative: FrozenModelOutputs, labels: Tensor,
                            response_mask: Tensor, beta_ce: float, chunk_size: int = 1024) -> Tensor:
    """``softmax((1 + β) z_p − β z_n)[y]`` at every response position, ``(N, T-1)`` float32, 0 elsewhere."""
    hidden_p = positive.last_hidden[:, :-1][response_mask]
    hidden_n = negative.last_hidden[:, :-1][response_mask]
    label_sel = labels[response_mask]
    parts = []
    with torch.no_grad():
        for start in chunk_starts(label_sel.shape[0], chunk_size, positive.head):  # equal counts under FSDP2
            chunk = slice(start, start + chunk_size)
            z_p, z_n = positive.head(hidden_p[chunk]).float(), negative.head(hidden_n[chunk]).float()
            z = (1 + beta_ce) * z_p - beta_ce * z_n
            parts.append(torch.log_softmax(z, -1).gather(-1, label_sel[chunk, None]).squeeze(-1).exp())
    values = torch.cat(parts)
    return scatter_response(values, response_mask)
