"""What every token masker implements, and what it receives from the reference forward pass."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from torch import Tensor, nn

from sparsepo_lightning.types import TokenMasks


@dataclass
class ReferenceOutputs:
    """What the reference forward pass exposes to maskers (all without gradient).

    Attributes:
        last_hidden: ``(2B, T, d)`` final hidden states (after the final norm).
        layers: the L block outputs ``(2B, T, d)`` each, when the masker asked for them, else None.
        head: the reference LM head (maps ``(n, d)`` to ``(n, V)`` logits).
    """

    last_hidden: Tensor
    layers: tuple[Tensor, ...] | None
    head: nn.Module


class TokenMasker(nn.Module):
    """Base class of token maskers: ``masker(reference_outputs, response_mask) -> TokenMasks``.

    A masker is bound once to the reference model (``bind``) so it can size its parameters or register hooks.
    Masks for the label at column ``t`` (shifted layout, ``types.py``) may only use reference states at
    positions ``≤ t``: the mask never sees the token it weights (docs/method.md §3.1).
    """

    needs_layers: bool = False
    """Whether the reference must return all L block outputs (learned masks)."""

    def bind(self, reference: nn.Module) -> None:
        """Attach to the reference model (size parameters, register hooks). Called once by the module."""

    def recording(self) -> AbstractContextManager:
        """Context manager around the reference forward pass (activation masks record their hooks in it)."""
        return nullcontext()

    def forward(self, reference: ReferenceOutputs, response_mask: Tensor) -> TokenMasks:
        """Masks of shape ``(2B, T-1)`` for the shifted response mask ``(2B, T-1)``."""
        raise NotImplementedError


class UniformMasker(TokenMasker):
    """``m_u = m_d = 1`` on every response token: SparsePO reduces exactly to TDPO1 (ablation / regression anchor).

    Reads no reference: ``UniformMasker()(response_mask=mask)``.
    """

    def forward(self, reference: ReferenceOutputs | None = None, response_mask: Tensor | None = None) -> TokenMasks:
        if response_mask is None:
            raise ValueError("UniformMasker needs the response mask: UniformMasker()(response_mask=mask).")
        return TokenMasks.ones_like(response_mask)
