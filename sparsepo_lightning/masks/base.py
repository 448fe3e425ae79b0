"""What every token masker implements, and what it receives from the reference forward pass."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor, nn

from sparsepo_lightning.types import PreferenceBatch, TokenMasks, TokenStats

if TYPE_CHECKING:
    from sparsepo_lightning.objectives import Objective


@dataclass
class ReferenceOutputs:
    """What the reference forward pass exposes to maskers (all without gradient).

    Attributes:
        last_hidden: ``(2B, T, d)`` final hidden states (after the final norm).
        layers: the L block outputs ``(2B, T, d)`` each, when the masker asked for them, else None.
        head: the reference LM head (maps ``(n, d)`` to ``(n, V)`` logits).
        unpack: when the reference ran on the packed layout (``data.layout: packed``): maps a per-position tensor
            of the packed rows ``(R, L, ...)`` (what a forward hook sees) to the padded layout ``(2B, T, ...)``
            (``packing.PackedRows.unpack``); None when it ran on the padded rows. ``last_hidden`` and ``layers``
            are already in the padded layout.
    """

    last_hidden: Tensor
    layers: tuple[Tensor, ...] | None
    head: nn.Module
    unpack: Callable[[Tensor], Tensor] | None = None


@dataclass
class FrozenModelOutputs:
    """What one extra frozen model (``PreferenceModule(frozen_models=...)``) gives a masker for one batch.

    Attributes:
        logps: ``(2B, T-1)`` float32 ``log π_name(y^t | x, y^{<t})`` of the label token, 0 outside the response.
        last_hidden: ``(2B, T, d)`` final hidden states (after the final norm).
        head: the model's LM head (``(n, d)`` → ``(n, V)`` logits), for maskers that need full distributions.
    """

    logps: Tensor
    last_hidden: Tensor
    head: nn.Module


@dataclass
class TokenContext:
    """Everything a token weighting may read for one batch, all without gradient (docs/token-weighting.md).

    Attributes:
        response_mask: ``(2B, T-1)`` bool, True on response tokens (shifted layout, ``types.py``).
        batch: the batch (``input_ids``, ``attention_mask``, ``labels``; per-token data weights if the data has
            span columns: ``batch.shifted_token_weights()``).
        stats: the step's per-token statistics, detached: policy and reference log-probs of the label, the
            full-vocabulary KL when the objective computes it. ``exp(stats.policy_logps)`` is the policy's
            confidence in the label.
        reference: the reference model's outputs (as the first argument of ``forward``), or None.
        frozen: outputs of the extra frozen models the masker asked for (``frozen_model_names``), by name.
    """

    response_mask: Tensor
    batch: PreferenceBatch | None = None
    stats: TokenStats | None = None
    reference: ReferenceOutputs | None = None
    frozen: dict[str, FrozenModelOutputs] = field(default_factory=dict)


class TokenMasker(nn.Module):
    """Base class of token maskers: ``masker(reference_outputs, response_mask, context) -> TokenMasks``.

    A masker is bound once to the reference model (``bind``) so it can size its parameters or register hooks.
    Masks for the label at column ``t`` (shifted layout, ``types.py``) may only use reference states at
    positions ``≤ t``: the mask never sees the token it weights (docs/method.md §3.1). Maskers that weight
    tokens by the step's statistics, by data columns or by extra frozen models read them from ``context``
    (``TokenContext``); such weights may depend on the token itself (they are not model inputs).
    """

    needs_layers: bool = False
    """Whether the reference must return all L block outputs (learned masks)."""
    needs_reference: bool = True
    """Whether ``bind`` and ``forward`` read the reference (False: the masker works with reference-free
    objectives and gets ``reference=None``)."""

    reference_cache_fields: tuple[str, ...] | None = None
    """With ``needs_reference``: the ``TokenStats`` fields of the reference the masker reads (from
    ``context.stats``), all of which ``model.reference_cache`` can store, e.g. ``("reference_logps",)``; None (the
    default) when it reads the live reference outputs (hidden states, block outputs, activations), which a cache
    cannot replace: the option is then refused at start. Maskers without ``needs_reference`` read nothing of it."""

    takes_context: bool = True
    """Whether ``forward`` takes the ``context`` argument (set per subclass from its signature: maskers written
    as ``forward(reference, response_mask)`` keep working, and the module skips building a context for them)."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.takes_context = "context" in inspect.signature(cls.forward).parameters

    def frozen_model_names(self) -> tuple[str, ...]:
        """Names of the extra frozen models (``PreferenceModule(frozen_models={name: path})``) whose outputs
        ``forward`` reads from ``context.frozen``; the module checks at start that each is configured."""
        return ()

    def distribution_statistics(self) -> dict:
        """Full-distribution statistics the masker reads from ``context.stats.distribution`` (detached), by name:
        ``{name: distributions.DistributionStatistic}`` (docs/full-distribution.md). Default: none."""
        return {}

    def use_objective(self, objective: Objective) -> None:
        """Read (or check against) the objective's parameters, e.g. its β. Called once by the module at
        construction, before ``bind``; raise ``ConfigError`` naming both options on a contradiction."""

    def bind(self, reference: nn.Module) -> None:
        """Attach to the reference model (size parameters, register hooks). Called once by the module."""

    def recording(self) -> AbstractContextManager:
        """Context manager around the reference forward pass (activation masks record their hooks in it)."""
        return nullcontext()

    def forward(self, reference: ReferenceOutputs | None, response_mask: Tensor,
                context: TokenContext | None = None) -> TokenMasks:
        """Masks of shape ``(2B, T-1)`` for the shifted response mask ``(2B, T-1)``; ``context`` carries the
        rest of the step (the module always passes it; direct callers may omit it for maskers that read only
        the reference)."""
        raise NotImplementedError


class UniformMasker(TokenMasker):
    """``m_u = m_d = 1`` on every response token: SparsePO reduces exactly to TDPO1 (ablation / regression anchor).

    Reads no reference: ``UniformMasker()(response_mask=mask)``.
    """

    needs_reference = False

    def forward(self, reference: ReferenceOutputs | None = None, response_mask: Tensor | None = None,
                context: TokenContext | None = None) -> TokenMasks:
        if response_mask is None:
            raise ValueError("UniformMasker needs the response mask: UniformMasker()(response_mask=mask).")
        return TokenMasks.ones_like(response_mask)
