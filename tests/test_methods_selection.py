"""Selection plug-ins (Rho-1-style excess loss, SamPO down-sampling) against naive per-row loops."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from sparsepo_lightning.losses import dpo_loss, weighted_dpo_loss
from sparsepo_lightning.masks.base import TokenContext
from sparsepo_lightning.methods.rho1 import ExcessLossSelection
from sparsepo_lightning.methods.sampo import DownSampledTokens
from sparsepo_lightning.methods.topk import rank_within, top_fraction
from sparsepo_lightning.types import TokenMasks, TokenStats


def _stats(seed: int = 0, rows: int = 6, cols: int = 9) -> TokenStats:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    lengths = torch.randint(1, cols + 1, (rows,), generator=g)
    starts = torch.randint(0, 3, (rows,), generator=g)
    for i in range(rows):
        mask[i, starts[i]: starts[i] + lengths[i]] = True
    policy = torch.randn(rows, cols, generator=g) * mask
    reference = torch.randn(rows, cols, generator=g) * mask
    return TokenStats(policy_logps=policy, reference_logps=reference, response_mask=mask)


def test_rank_within_matches_a_sort_per_row():
    stats = _stats()
    scores, mask = stats.policy_logps, stats.response_mask
    ranks = rank_within(scores, mask)
    for i in range(scores.shape[0]):
        positions = [t for t in range(scores.shape[1]) if mask[i, t]]
        ordered = sorted(positions, key=lambda t: (-float(scores[i, t]), t))
        for rank, t in enumerate(ordered):
            assert int(ranks[i, t]) == rank


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.6, 1.0])
def test_top_fraction_per_response_and_per_batch_match_naive_loops(fraction):
    stats = _stats(1)
    scores, mask = stats.policy_logps, stats.response_mask
    got = top_fraction(scores, mask, fraction, "response")
    for i in range(scores.shape[0]):
        positions = [t for t in range(scores.shape[1]) if mask[i, t]]
        keep = math.ceil(fraction * len(positions) - 1e-6)
        chosen = sorted(positions, key=lambda t: (-float(scores[i, t]), t))[:keep]
        expected = [1.0 if t in chosen else 0.0 for t in range(scores.shape[1])]
        assert got[i].tolist() == expected
    got = top_fraction(scores, mask, fraction, "batch")
    flat = [(i, t) for i in range(scores.shape[0]) for t in range(scores.shape[1]) if mask[i, t]]
    keep = math.ceil(fraction * len(flat) - 1e-6)
    chosen = set(sorted(flat, key=lambda it: (-float(scores[it]), it[0] * scores.shape[1] + it[1]))[:keep])
    assert got.sum() == keep
    for i, t in flat:
        assert got[i, t] == (1.0 if (i, t) in chosen else 0.0)


def test_excess_loss_selection_keeps_the_tokens_the_policy_lowered_most():
    # one pair, 4 response tokens each; excess loss = −ρ = ref − policy
    policy = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-1.0, -1.0, -1.0, -1.0]])
    reference = torch.tensor([[-1.5, -1.0, -0.5, -1.0], [-2.0, -0.5, -1.2, -0.9]])
    mask = torch.ones(2, 4, dtype=torch.bool)
    stats = TokenStats(policy_logps=policy, reference_logps=reference, response_mask=mask)
    # excess: row 0 [-0.5, 1.0, 0.0, 2.0]; row 1 [-1.0, 0.5, -0.2, -0.1]
    masks = ExcessLossSelection(keep_ratio=0.5, scope="response")(None, mask, TokenContext(mask, stats=stats))
    assert masks.reward.tolist() == [[0, 1, 0, 1], [0, 1, 0, 1]]
    masks = ExcessLossSelection(keep_ratio=0.25, scope="batch")(None, mask, TokenContext(mask, stats=stats))
    assert masks.reward.tolist() == [[0, 1, 0, 1], [0, 0, 0, 0]]  # top 2 of 8: excess 2.0 and 1.0
    # loss by hand: β(Σ kept ρ_w − Σ kept ρ_l) with the response-scope selection
    masks = ExcessLossSelection(keep_ratio=0.5, scope="response")(None, mask, TokenContext(mask, stats=stats))
    out = weighted_dpo_loss(stats, masks, beta=0.5)
    logit = 0.5 * ((-1.0 - 2.0) - (-0.5 + -0.1))
    assert_close(out.logit, torch.tensor([logit]))
    assert_close(out.loss, torch.tensor([math.log1p(math.exp(-logit))]))


def test_excess_loss_selection_needs_the_context():
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="TokenContext"):
        ExcessLossSelection()(None, mask)
    with pytest.raises(ValueError, match="keep_ratio"):
        ExcessLossSelection(keep_ratio=0.0)


def test_weighted_dpo_with_unit_weights_is_dpo():
    stats = _stats(2)
    ones = TokenMasks.ones_like(stats.response_mask)
    for a, b in ((weighted_dpo_loss(stats, ones, 0.3), dpo_loss(stats, 0.3)),
                 (weighted_dpo_loss(stats, None, 0.3), dpo_loss(stats, 0.3))):
        assert_close(a.loss, b.loss)
        assert_close(a.logit, b.logit)


def test_sampo_keeps_the_shorter_length_on_both_sides_naive():
    stats = _stats(3, rows=8, cols=10)
    mask = stats.response_mask
    sampler = DownSampledTokens(seed=5)
    masks = sampler(None, mask)
    half = mask.shape[0] // 2
    for i in range(half):
        shorter = min(int(mask[i].sum()), int(mask[half + i].sum()))
        for row in (i, half + i):
            kept = masks.reward[row]
            assert int(kept.sum()) == shorter, "each side keeps min(|y_w|, |y_l|) tokens"
            assert bool(((kept > 0) <= mask[row]).all()), "only response tokens are kept"
            if int(mask[row].sum()) == shorter:
                assert bool((kept.bool() == mask[row]).all()), "the shorter response keeps all its tokens"
    # reproducible per call index, different between calls, resumable through the extra state
    again = DownSampledTokens(seed=5)
    assert_close(again(None, mask).reward, masks.reward)
    second = sampler(None, mask).reward
    restored = DownSampledTokens(seed=5)
    restored.set_extra_state({"calls": 1})
    assert_close(restored(None, mask).reward, second)


def test_sampo_draws_are_uniform_over_the_longer_response():
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, :6] = True  # chosen: 6 tokens
    mask[1, :2] = True  # rejected: 2 tokens
    sampler = DownSampledTokens(seed=0)
    counts = torch.zeros(6)
    for _ in range(3000):
        counts += sampler(None, mask).reward[0]
    assert_close(counts / 3000, torch.full((6,), 2 / 6), atol=0.03, rtol=0)
