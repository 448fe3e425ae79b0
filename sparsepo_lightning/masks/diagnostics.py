"""Mask diagnostics: how sparse, how alive and how concentrated a token weighting is (docs/sparsity.md).

Beyond the share of exact zeros and the mean, a token-credit method is only doing token *choice* when its
weights differ between the tokens of a response; the critique of token-credit methods in arXiv 2606.00257 asks for
the concentration of the weights within each response and for the share of their variance that merely separates
responses. For weights ``w`` ``(R, T)`` ≥ 0 on a response mask (row ``r`` has ``n_r`` response tokens, mean
``μ_r``, all sums over its response tokens):

- ``zeros_share``: ``Σ_r #{w = 0} / Σ_r n_r`` (exact zeros, as ``masks/sparsity_*`` but a share, not %);
- ``mean``: ``Σ w / Σ n_r``;  ``mean_kept``: ``Σ w / #{w ≠ 0}`` (the weight a kept token carries; 0 if none);
- ``gini``: per response ``Σ_i (2i − n − 1) w_(i) / (n Σ w)`` over the weights sorted ascending (0: all equal,
  ``1 − 1/n``: one token carries everything; 0 for an all-zero response), averaged over responses;
- ``effective_token_ratio``: per response ``(Σ w)² / (n Σ w²)`` (1: uniform; ``k/n`` for ``k`` equal kept tokens;
  0 for an all-zero response), averaged over responses;
- ``within_cv``: per response ``std(w) / μ_r`` (population std; 0 when ``μ_r = 0``), averaged over responses;
- ``between_variance_share``: ``Σ_r n_r (μ_r − μ)² / Σ (w − μ)²`` over all response tokens (``μ`` the mean of
  all of them): the share of the weight variance that lies between responses (0 when the weights are constant).

Rows without response tokens are left out. Every value is float32, computed with masked reductions over the whole
batch (no loop over rows, no host synchronisation). The callbacks aggregate the same per-response parts over a
logging window and over ranks (:func:`diagnostic_stats`), so a window's value is the value of the concatenated
batches.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from sparsepo_lightning.losses import split_pairs
from sparsepo_lightning.metrics import Stats
from sparsepo_lightning.types import TokenMasks

LOGGED = ("mean_kept", "gini", "effective_token_ratio", "within_cv", "between_variance_share")
"""Diagnostics the statistics callback and the run summary add to ``masks/sparsity_*`` and ``masks/mean_*``."""

_MOMENTS = ("_m1", "_m2", "_mb")
"""Token means of ``w``, ``w²`` and ``μ_r²``: the additive parts of ``between_variance_share``."""


def _parts(weights: Tensor, response_mask: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-response ``(value, weight)`` pairs ``(R,)`` whose weighted means give the diagnostics."""
    w = weights.detach().float() * response_mask  # (R, T)
    n = response_mask.sum(-1).float()
    n1 = n.clamp(min=1)
    total, square = w.sum(-1), (w * w).sum(-1)
    kept = ((w != 0) & response_mask).sum(-1).float()
    mean = total / n1
    centred = (w - mean[:, None]) * response_mask
    std = ((centred * centred).sum(-1) / n1).sqrt()
    rows = (n > 0).float()
    # Gini from the ascending order: non-response positions sort last (+inf) and get coefficient 0.
    rank = torch.arange(1, w.shape[-1] + 1, device=w.device, dtype=torch.float32)[None, :]  # (1, T)
    inside = rank <= n[:, None]  # (R, T): the first n_r sorted positions hold the response weights
    ordered = w.masked_fill(~response_mask, torch.inf).sort(-1).values.masked_fill(~inside, 0.0)
    coefficient = (2 * rank - n[:, None] - 1) * inside
    gini = torch.where(total > 0, (coefficient * ordered).sum(-1) / (n1 * total.clamp(min=1e-30)), 0.0)
    effective = torch.where(square > 0, total * total / (n1 * square.clamp(min=1e-30)), 0.0)
    cv = torch.where(mean > 0, std / mean.clamp(min=1e-30), 0.0)
    return {"zeros_share": ((n - kept) / n1, n), "mean": (mean, n), "mean_kept": (total / kept.clamp(min=1), kept),
            "gini": (gini, rows), "effective_token_ratio": (effective, rows), "within_cv": (cv, rows),
            "_m1": (mean, n), "_m2": (square / n1, n), "_mb": (mean * mean, n)}


def between_shares(values: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """``between_variance_share`` from the token moments ``{prefix}_m1/_m2/_mb{suffix}`` of ``values``:
    ``(E[μ_r²] − E[w]²) / (E[w²] − E[w]²)``, 0 when the total variance is below 1e-6 of ``E[w²]`` (constant
    weights, where float32 rounding would otherwise decide)."""
    out = {}
    for name, m1 in values.items():
        if not name.startswith(prefix + "_m1"):
            continue
        suffix = name.removeprefix(prefix + "_m1")
        m2, mb = values[f"{prefix}_m2{suffix}"], values[f"{prefix}_mb{suffix}"]
        total = m2 - m1 * m1
        share = ((mb - m1 * m1) / total.clamp(min=1e-30)).clamp(0.0, 1.0)
        out[f"{prefix}between_variance_share{suffix}"] = torch.where(total > 1e-6 * m2, share, torch.zeros_like(share))
    return out


def mask_diagnostics(weights: Tensor, response_mask: Tensor) -> dict[str, Tensor]:
    """The diagnostics of the module docstring for one batch of weights.

    Args:
        weights: ``(R, T)`` token weights (any float dtype; read in float32, detached).
        response_mask: ``(R, T)`` bool, True on response tokens.

    Returns:
        ``zeros_share``, ``mean``, ``mean_kept``, ``gini``, ``effective_token_ratio``, ``within_cv``,
        ``between_variance_share``: scalar float32 tensors.
    """
    reduced = Stats(means=_parts(weights, response_mask)).reduce()
    reduced.update(between_shares(reduced))
    return {name: value for name, value in reduced.items() if not name.startswith("_")}


def diagnostic_stats(masks: TokenMasks, response_mask: Tensor) -> Stats:
    """Per-response parts of ``LOGGED`` for the reward and KL masks, chosen and rejected, as ``Stats`` named
    ``masks/{diagnostic}_{reward,kl}_{chosen,rejected}`` (and the ``masks/_m*`` moments that
    :func:`between_shares` turns into ``between_variance_share``; ``prefix="masks/"``). A common mask is measured
    once and reported under both names."""
    stats = Stats()
    common = masks.kl.data_ptr() == masks.reward.data_ptr() and masks.kl.shape == masks.reward.shape
    for name, mask in (("reward", masks.reward), ("kl", masks.kl)):
        if name == "kl" and common:
            stats.means.update({key.replace("_reward_", "_kl_"): value for key, value in stats.means.items()})
            break
        for part, (values, weights) in _parts(mask, response_mask).items():
            if part in LOGGED or part in _MOMENTS:
                for side, rows, row_weights in zip(("chosen", "rejected"), split_pairs(values), split_pairs(weights),
                                                   strict=True):
                    stats.means[f"masks/{part}_{name}_{side}"] = (rows, row_weights)
    return stats


def is_internal(name: str) -> bool:
    """Whether a statistic is an intermediate moment (``masks/_m1_...``) rather than a reported value."""
    return name.rsplit("/", 1)[-1].startswith("_")
