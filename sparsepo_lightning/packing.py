"""The packed layout of a batch of pairs (``data.layout: packed``): what the models run on, and the way back.

In the padded layout (``types.py``) pair ``i`` is two rows, ``[prompt | chosen]`` and ``[prompt | rejected]``, each
padded to the batch's longest row, so the prompt goes through each model twice and padding costs full compute. In
the packed layout pair ``i`` is one *segment* ``[shared | chosen tail | rejected tail]``:

- ``shared`` is the longest common prefix of the two padded-layout rows (the prompt, and more when both responses
  start alike; less when the tokenizer merged the prompt's last characters differently into the two responses);
- the rejected tail attends to the shared prefix and to itself, never to the chosen tail (a block mask);
- position ids continue from the end of the shared prefix in *both* tails, as in the two padded rows.

Every position of a segment then sees exactly the tokens, at exactly the positions, it sees in its padded row, so
its hidden states are those of the padded layout (up to float rounding of the attention's summation order).
Segments are packed into rows (all of a micro-batch in one row, or first-fit into rows of at most ``pack_length``
tokens); only rows of different lengths are padded. The model runs once on the packed rows, and :meth:`unpack`
gathers its outputs back into the ``(2B, T, ...)`` padded layout, so statistics, masks, objectives, metrics and
callbacks are unchanged (the batch keeps its padded ``input_ids``/``labels``/``attention_mask`` as index tensors).

Attention: a 4D mask ``(R, 1, L, L)`` (transformers uses a 4D mask as given): boolean for ``sdpa``, additive float
for ``eager``, a FlexAttention ``BlockMask`` for ``flex_attention`` (whose kernel skips fully masked blocks).
Variable-length flash attention cannot express one sequence attending to a prefix but not to its sibling, so
``flash_attention_*`` implementations are refused at start (``check_attention``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sparsepo_lightning.errors import ConfigError

SHARED, CHOSEN, REJECTED = 0, 1, 2
"""``PackedRows.branch`` values: the shared prefix, the chosen tail, the rejected tail."""

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")
"""Attention implementations that take the packed layout's 4D mask."""


@dataclass
class PackedRows:
    """R packed rows of L tokens holding the B pairs of a batch (one segment per pair).

    Attributes:
        input_ids: ``(R, L)`` int64 token ids; padding uses the tokenizer's pad id.
        position_ids: ``(R, L)`` int64 position of each token in its padded-layout row; 0 on padding.
        segment_ids: ``(R, L)`` int64 index of the pair (0..B-1) each token belongs to; -1 on padding.
        branch: ``(R, L)`` int64 ``SHARED``, ``CHOSEN`` or ``REJECTED``; ``SHARED`` on padding.
        index: ``(2B, T)`` int64: for each position of the padded layout (chosen rows first), the flat position
            ``row * L + column`` of the same token in the packed rows; 0 on padded-layout padding.
    """

    input_ids: Tensor
    position_ids: Tensor
    segment_ids: Tensor
    branch: Tensor
    index: Tensor

    def to(self, device: torch.device | str) -> PackedRows:
        """The same layout with every tensor on ``device``."""
        return PackedRows(**{name: value.to(device) for name, value in vars(self).items()})

    @property
    def num_tokens(self) -> int:
        """Positions the models run on (``R · L``, padding between rows included)."""
        return self.input_ids.numel()

    def attention_mask(self, implementation: str | None) -> Tensor:
        """The ``(R, 1, L, L)`` mask: query ``q`` sees key ``k`` iff both are in the same segment, ``k ≤ q``, and not
        (``q`` in the rejected tail and ``k`` in the chosen tail). Padding sees itself only (no empty softmax row).

        Args:
            implementation: the model's ``config._attn_implementation``; ``eager`` gets an additive float32 mask
                (0 / the most negative float32), ``flex_attention`` a ``BlockMask`` of the same rule (its kernel
                skips the blocks the rule masks out), anything else a boolean tensor (True = attend).
        """
        seg, branch = self.segment_ids, self.branch
        if implementation == "flex_attention":
            return self._block_mask()
        length = seg.shape[1]
        positions = torch.arange(length, device=seg.device)
        causal = positions[None, :] <= positions[:, None]  # (L, L): key ≤ query
        same = seg[:, :, None] == seg[:, None, :]  # (R, L, L)
        sibling = (branch[:, :, None] == REJECTED) & (branch[:, None, :] == CHOSEN)
        allowed = same & causal & ~sibling & (seg[:, :, None] >= 0)
        allowed |= torch.eye(length, dtype=torch.bool, device=seg.device)
        allowed = allowed[:, None]  # (R, 1, L, L)
        if implementation == "eager":
            return torch.zeros(allowed.shape, device=seg.device).masked_fill_(~allowed, torch.finfo(torch.float32).min)
        return allowed

    def _block_mask(self) -> Any:
        """The same rule as a FlexAttention ``BlockMask`` (``R`` rows, all heads)."""
        from torch.nn.attention.flex_attention import create_block_mask

        seg, branch = self.segment_ids, self.branch

        def rule(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
            sibling = (branch[b, q] == REJECTED) & (branch[b, k] == CHOSEN)
            return ((seg[b, q] == seg[b, k]) & (k <= q) & ~sibling & (seg[b, q] >= 0)) | (q == k)

        length = seg.shape[1]
        return create_block_mask(rule, B=seg.shape[0], H=None, Q_LEN=length, KV_LEN=length, device=seg.device)

    def unpack(self, packed: Tensor, attention_mask: Tensor) -> Tensor:
        """Gather a per-position tensor of the packed rows into the padded layout.

        Args:
            packed: ``(R, L, ...)`` model outputs on the packed rows (hidden states, per-token activations).
            attention_mask: ``(2B, T)`` padded-layout attention mask; its padding positions are set to 0.

        Returns:
            ``(2B, T, ...)``, differentiable with respect to ``packed``.
        """
        rest = packed.shape[2:]
        flat = packed.reshape(-1, *rest)
        rows = flat.index_select(0, self.index.reshape(-1)).reshape(*self.index.shape, *rest)
        keep = attention_mask.bool().reshape(*attention_mask.shape, *([1] * len(rest)))
        return torch.where(keep, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))


def check_attention(implementation: str | None, model_name: str) -> None:
    """Raise a ``ConfigError`` with the fix when a model's attention cannot take the packed layout's 4D mask."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(
            f"data.layout=packed needs an attention implementation that takes a 4D block mask "
            f"({' or '.join(ATTENTION_IMPLEMENTATIONS)}); {model_name} uses {implementation!r}. Fix: "
            "model.attn_implementation: sdpa (or flex_attention), or data.layout: padded."
        )
