"""SamPO: down-sample the longer response's per-token log-ratios to the length of the shorter one.

Lu et al., *Eliminating Biased Length Reliance of Direct Preference Optimization via Down-Sampled KL Divergence*,
EMNLP 2024, arXiv 2406.10957, paper Eq. 10: DPO's implicit reward sums ``ρ^t`` over a response, so the longer
response carries more terms; SamPO sums, for both responses of a pair, ``T_m = min(|y_w|, |y_l|)`` per-token
log-ratios drawn uniformly without replacement from that response (redrawn every step), so both sums have the same
number of terms; the shorter response keeps all its tokens. With ``WeightedDPO`` the kept tokens get weight 1 and
the others 0, and the policy and reference log-probs use the same tokens, as Eq. 10 writes it (the released code,
github.com/LuJunru/SamPO at 25e9631, draws the reference's subset separately).

Draws are reproducible and resume exactly: call ``k`` draws from a CPU generator seeded with
``seed + k·1_000_003`` (a counter saved in checkpoints, as ``RandomMasker`` does).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsepo_lightning.losses import split_pairs
from sparsepo_lightning.masks.base import ReferenceOutputs, TokenContext, TokenMasker
from sparsepo_lightning.methods.topk import rank_within
from sparsepo_lightning.types import TokenMasks

_STREAM_STRIDE = 1_000_003


class DownSampledTokens(TokenMasker):
    """For each pair, weight 1 on ``min(|y_w|, |y_l|)`` tokens of each response drawn uniformly without replacement
    (all tokens of the shorter response), 0 elsewhere.

    Args:
        seed: seeds the draws (see the module docstring).
    """

    needs_reference = False

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = int(seed)
        self.calls = 0

    def get_extra_state(self) -> dict[str, int]:
        return {"calls": self.calls}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.calls = int(state["calls"])

    def forward(self, reference: ReferenceOutputs | None, response_mask: Tensor,
                context: TokenContext | None = None) -> TokenMasks:
        generator = torch.Generator().manual_seed(self.seed + self.calls * _STREAM_STRIDE)
        self.calls += 1
        scores = torch.rand(response_mask.shape, generator=generator).to(response_mask.device)
        lengths = torch.stack(split_pairs(response_mask.sum(-1)))  # (2, B)
        shorter = lengths.min(0).values.repeat(2)[:, None]  # (2B, 1): T_m of each row's pair
        kept = ((rank_within(scores, response_mask) < shorter) & response_mask).float()
        return TokenMasks(reward=kept, kl=kept)
