"""Selecting a fraction of response tokens by a score, vectorised (no loop over rows), for selection methods."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from sparsepo_lightning.errors import ConfigError

Scope = Literal["batch", "response"]
"""Where the top fraction is taken: over all response tokens of the batch (Rho-1's token selection) or within each
response separately."""


def check_fraction(fraction: float, name: str, owner: str) -> None:
    """A kept fraction must lie in (0, 1]."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"{owner}: {name} must be in (0, 1], got {fraction}. Fix: e.g. {name}: 0.6 keeps 60 % of "
                         "the response tokens.")


def rank_within(scores: Tensor, mask: Tensor) -> Tensor:
    """0-based descending rank of each masked entry of every row among that row's masked entries (ties broken by
    position, earlier first); off-mask entries rank after every masked one. ``(N, T)`` → ``(N, T)`` int64."""
    keyed = scores.float().masked_fill(~mask, -torch.inf)
    order = torch.sort(keyed, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return ranks


def top_fraction(scores: Tensor, mask: Tensor, fraction: float, scope: Scope = "response") -> Tensor:
    """1.0 on the ``ceil(fraction · n)`` highest-scoring masked entries, 0 elsewhere (float32, shaped like ``mask``).

    ``scope="response"``: ``n`` is each row's number of masked entries (every non-empty row keeps at least one);
    ``scope="batch"``: ``n`` is the number of masked entries of the whole tensor, ranked together.
    """
    if scope == "response":
        keep = torch.ceil(fraction * mask.sum(-1, keepdim=True).float() - 1e-6).long()  # (N, 1)
        return ((rank_within(scores, mask) < keep) & mask).float()
    if scope != "batch":
        raise ValueError(f"scope must be 'response' or 'batch', got {scope!r}.")
    flat_rank = rank_within(scores.reshape(1, -1), mask.reshape(1, -1)).reshape(mask.shape)
    keep = torch.ceil(fraction * mask.sum().float() - 1e-6).long()
    return ((flat_rank < keep) & mask).float()


def last_response_token(mask: Tensor) -> Tensor:
    """``(N, T)`` bool, True on the last masked entry of each row (the response's final label: the appended EOS, or
    the last kept token of a truncated response). Rows hold one contiguous response (padded layout)."""
    following = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=-1)
    return mask & ~following


def rejected_rows(values: Tensor) -> Tensor:
    """``(2B, 1)`` bool, True on the rejected rows (the last B) of a 2B-row tensor (chosen rows first)."""
    rows = values.shape[0]
    return torch.arange(rows, device=values.device)[:, None] >= rows // 2
