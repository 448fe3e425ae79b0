"""Random token masks at a *fixed* keep rate and weight.

``RandomMasker`` keeps each response token independently with probability ``keep_rate`` and gives kept tokens the
weight ``value``. A run with ``keep_rate = 1 − sparsity`` and ``value`` = a learned mask's mean kept weight spends
the same credit budget as that run *would at the end*, spread at random, but with rates fixed for the whole run.

With ``keep_rate: 1`` every response token gets the constant ``value``: the objective is then exactly TDPO1 at
``β · value`` (no token is chosen, nothing is random). This is what the sentiment study's "matched random" arm
ran: a control for "the mask only rescales β", not for "which tokens". To remove only the choice of tokens from
any method, wrap its masker in a control of ``masks/controls.py`` (``PermutedControl``, ``ResponseMeanControl``,
``BernoulliControl``, which follow the wrapped masker's rate and weights step by step; docs/sparsity.md).

Draws are reproducible and resume exactly: call ``k`` of the masker (a counter saved in checkpoints as the
module's extra state) draws the reward mask from a CPU generator seeded with ``seed + 2k·1_000_003`` (the
independent KL mask from ``seed + (2k+1)·1_000_003``). The masks do not depend on the reference states and carry
no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsepo_lightning.masks.base import ReferenceOutputs, TokenContext, TokenMasker
from sparsepo_lightning.types import TokenMasks

_STREAM_STRIDE = 1_000_003
"""Seed offset between successive calls (a prime, so call streams of different seeds do not coincide)."""


class RandomMasker(TokenMasker):
    """Bernoulli(``keep_rate``) masks on the response tokens, ``value`` where kept, 0 elsewhere.

    Args:
        keep_rate: probability that a response token is kept, in (0, 1] (1 − the target sparsity / 100); 1 with a
            constant ``value`` is TDPO1 at ``β · value``, not a token-choice control (module docstring).
        value: weight of a kept token (> 0); 1 gives TDPO1 weights on the kept tokens.
        seed: seeds the draws (see the module docstring).
        independent: draw the KL mask separately from the reward mask (same rate and value); default one
            common mask, ``m_d = m_u``.
    """

    needs_reference = False

    def __init__(self, keep_rate: float, value: float = 1.0, seed: int = 0, independent: bool = False) -> None:
        super().__init__()
        if not 0.0 < keep_rate <= 1.0:
            raise ValueError(f"RandomMasker: keep_rate must be in (0, 1], got {keep_rate}. Fix: 1 - sparsity/100 "
                             "of the run to match (e.g. 0.4 for 60 % zeros).")
        if not value > 0.0:
            raise ValueError(f"RandomMasker: value must be > 0, got {value}.")
        self.keep_rate = float(keep_rate)
        self.value = float(value)
        self.seed = int(seed)
        self.independent = independent
        self.calls = 0

    def get_extra_state(self) -> dict[str, int]:
        return {"calls": self.calls}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.calls = int(state["calls"])

    def _draw(self, response_mask: Tensor, stream: int) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed + stream * _STREAM_STRIDE)
        uniform = torch.rand(response_mask.shape, generator=generator).to(response_mask.device)
        return ((uniform < self.keep_rate) & response_mask).float() * self.value

    def forward(self, reference: ReferenceOutputs | None, response_mask: Tensor,
                context: TokenContext | None = None) -> TokenMasks:
        call = self.calls  # a host-side counter: no device synchronisation
        self.calls += 1
        reward = self._draw(response_mask, 2 * call)
        if not self.independent:
            return TokenMasks(reward=reward, kl=reward, common=True, learned=False)
        return TokenMasks(reward=reward, kl=self._draw(response_mask, 2 * call + 1), common=False, learned=False)
