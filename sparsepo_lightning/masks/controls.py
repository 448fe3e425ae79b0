"""Controls that isolate token choice: maskers that wrap any masker and keep everything of it but *which* tokens.

Each control runs the wrapped masker at every step (the same inputs, its own parameters, schedule and state) and
changes only where its weights land, so a run with the control differs from the run with the wrapped masker by
token choice alone (docs/sparsity.md):

- :class:`PermutedControl`: the wrapped weights shuffled across the response tokens of each response, a fresh
  permutation at every step: same multiset of weights per response, same scale, same sparsity;
- :class:`ResponseMeanControl`: every response token gets its response's mean wrapped weight;
- :class:`BernoulliControl`: independent keeps at the wrapped masker's keep rate of that batch (its share of
  non-zero response weights), each kept token weighted by the wrapped masker's mean kept weight of that batch.

What trains: the wrapped masker's parameters get the gradient of the control's output, which is an exact function
of the wrapped weights: under ``PermutedControl`` the weight of token ``t`` receives the credit of the token it was
moved to (another token of the same response); under ``ResponseMeanControl`` every weight receives its response's
mean credit; under ``BernoulliControl`` every non-zero weight receives the batch's mean credit of the kept tokens
(the keep rate is a count and carries no gradient). A learned mask under a control can therefore learn its scale
and the distribution of its weights, never which token deserves the weight.

Draws are reproducible and resume exactly: training call ``k`` draws from a CPU generator seeded with
``seed + (4k + s)·1_000_003`` (``s`` = 0 reward, 1 KL), evaluation call ``k`` from ``seed + (4k + 2 + s)·1_000_003``
with its own counter, so validation never shifts the training draws. Both counters are saved in checkpoints as the
control's extra state; the wrapped masker's own state (parameters, ``RandomMasker`` counters) is saved with it as a
submodule.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn

from sparsepo_lightning.masks.base import ReferenceOutputs, TokenContext, TokenMasker
from sparsepo_lightning.types import TokenMasks

_STREAM_STRIDE = 1_000_003
"""Seed offset between successive draws (a prime, as ``masks/random.py``)."""


class _Control(TokenMasker):
    """Shared wrapping: delegate everything the module asks of a masker, count calls, draw seeded uniforms."""

    def __init__(self, masker: TokenMasker, seed: int = 0) -> None:
        """
        Args:
            masker: the masker whose token choice the control removes (any ``TokenMasker``: learned, activation,
                the plug-ins of ``sparsepo_lightning.methods``, a user's own).
            seed: seeds the control's draws (module docstring).
        """
        super().__init__()
        if not isinstance(masker, TokenMasker):
            raise TypeError(f"{type(self).__name__}: masker must be a TokenMasker, got {type(masker).__name__}. Fix: "
                            "model.masker.init_args.masker: {class_path: <a masker>, init_args: {...}}.")
        self.masker = masker
        self.seed = int(seed)
        self.needs_layers = masker.needs_layers
        self.needs_reference = masker.needs_reference
        self.calls = 0
        self.eval_calls = 0

    def frozen_model_names(self) -> tuple[str, ...]:
        return self.masker.frozen_model_names()

    def bind(self, reference: nn.Module) -> None:
        self.masker.bind(reference)

    def recording(self) -> AbstractContextManager:
        return self.masker.recording()

    def get_extra_state(self) -> dict[str, int]:
        return {"calls": self.calls, "eval_calls": self.eval_calls}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.calls, self.eval_calls = int(state["calls"]), int(state["eval_calls"])

    def _wrapped(self, reference: ReferenceOutputs | None, response_mask: Tensor,
                 context: TokenContext | None) -> TokenMasks:
        if self.masker.takes_context:
            return self.masker(reference, response_mask, context)
        return self.masker(reference, response_mask)

    def _next_streams(self) -> int:
        """First seed stream of this call (host-side counters: no device synchronisation)."""
        if self.training:
            self.calls += 1
            return 4 * (self.calls - 1)
        self.eval_calls += 1
        return 4 * (self.eval_calls - 1) + 2

    def _uniform(self, like: Tensor, stream: int) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed + stream * _STREAM_STRIDE)
        return torch.rand(like.shape, generator=generator).to(like.device)

    def forward(self, reference: ReferenceOutputs | None, response_mask: Tensor,
                context: TokenContext | None = None) -> TokenMasks:
        masks = self._wrapped(reference, response_mask, context)
        stream = self._next_streams()
        if masks.common:
            reward = self._control(masks.reward, response_mask, stream)
            return TokenMasks(reward=reward, kl=reward, common=True, learned=masks.learned)
        reward, kl = self._control_pair(masks.reward, masks.kl, response_mask, stream)
        return TokenMasks(reward=reward, kl=kl, common=False, learned=masks.learned)

    def _control(self, weights: Tensor, response_mask: Tensor, stream: int) -> Tensor:
        raise NotImplementedError

    def _control_pair(self, reward: Tensor, kl: Tensor, response_mask: Tensor, stream: int) -> tuple[Tensor, Tensor]:
        """Independent masks: each through ``_control`` (the KL mask on stream + 1)."""
        return self._control(reward, response_mask, stream), self._control(kl, response_mask, stream + 1)


class PermutedControl(_Control):
    """The wrapped weights shuffled across the response tokens of each response, a new permutation per step.

    ``out[r, t] = w[r, π_r(t)]`` with ``π_r`` a uniform random permutation of row ``r``'s response positions
    (seeded keys sorted per row, non-response positions pushed to the end; no loop over rows). Independent reward
    and KL masks move together (one permutation per row for both), so each token keeps its pair of weights.
    """

    def _permutation(self, response_mask: Tensor, stream: int) -> tuple[Tensor, Tensor]:
        keys = self._uniform(response_mask, stream).masked_fill(~response_mask, 2.0)  # non-response sorts last
        source = torch.argsort(keys, dim=-1, stable=True)  # (R, T): the response positions in random order first
        target = torch.argsort((~response_mask).to(torch.uint8), dim=-1, stable=True)  # ... in their own order
        return source, target

    @staticmethod
    def _move(weights: Tensor, response_mask: Tensor, source: Tensor, target: Tensor) -> Tensor:
        moved = torch.zeros_like(weights).scatter(-1, target, weights.gather(-1, source))
        return moved * response_mask

    def _control(self, weights: Tensor, response_mask: Tensor, stream: int) -> Tensor:
        return self._move(weights, response_mask, *self._permutation(response_mask, stream))

    def _control_pair(self, reward: Tensor, kl: Tensor, response_mask: Tensor, stream: int) -> tuple[Tensor, Tensor]:
        source, target = self._permutation(response_mask, stream)
        return self._move(reward, response_mask, source, target), self._move(kl, response_mask, source, target)


class ResponseMeanControl(_Control):
    """Every response token weighted by its response's mean wrapped weight: ``out[r, t] = Σ_s w[r, s] / n_r``.

    Deterministic (no draw); same total weight per response as the wrapped masker, no token distinguished.
    """

    def _control(self, weights: Tensor, response_mask: Tensor, stream: int) -> Tensor:
        counts = response_mask.sum(-1, keepdim=True).clamp(min=1)
        return (weights * response_mask).sum(-1, keepdim=True) / counts * response_mask


class BernoulliControl(_Control):
    """Independent keeps with the wrapped masker's keep rate of the batch, at its mean kept weight of the batch.

    With ``k`` non-zero wrapped weights among the ``N`` response tokens of the batch (this micro-batch, this rank):
    keep each response token with probability ``k / N`` and give it ``Σ w / k``, the wrapped masker's mean kept
    weight (0 everywhere when ``k = 0``). Rate and weight follow the wrapped masker step by step, not an average
    over training; the rate is a tensor, so no host synchronisation. Independent reward and KL masks are drawn
    separately, each at its own rate and weight.
    """

    def _control(self, weights: Tensor, response_mask: Tensor, stream: int) -> Tensor:
        nonzero = ((weights != 0) & response_mask).sum().float()
        rate = nonzero / response_mask.sum().clamp(min=1)
        value = (weights * response_mask).sum() / nonzero.clamp(min=1)
        keep = (self._uniform(response_mask, stream) < rate) & response_mask
        return keep * value
