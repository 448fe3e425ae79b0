"""Each token-weighting plug-in against numbers computed by hand from its paper's formula, and against a naive
per-row loop; plus the generic objectives (WeightedDPO, MaskedSimPO) by hand and their identities."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from sparsepo_lightning.errors import ConfigError
from sparsepo_lightning.losses import masked_simpo_loss, simpo_loss, weighted_dpo_loss
from sparsepo_lightning.masks.base import FrozenModelOutputs, TokenContext
from sparsepo_lightning.methods.cdpo import CriticalTokenWeights
from sparsepo_lightning.methods.confpo import LowConfidenceSelection
from sparsepo_lightning.methods.sepo import OracleSelection
from sparsepo_lightning.methods.tgdpo import TokenRewardBeta
from sparsepo_lightning.methods.tisdpo import ContrastiveImportance
from sparsepo_lightning.objectives import MaskedSimPO, WeightedDPO
from sparsepo_lightning.types import PreferenceBatch, TokenMasks, TokenStats


def softplus_neg(x: float) -> float:
    """−log σ(x)."""
    return math.log1p(math.exp(-x))


def _pair(chosen: list[float], rejected: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """One pair as 2 rows padded to a common width; returns (values, response_mask)."""
    width = max(len(chosen), len(rejected))
    values = torch.zeros(2, width)
    mask = torch.zeros(2, width, dtype=torch.bool)
    for row, side in enumerate((chosen, rejected)):
        values[row, : len(side)] = torch.tensor(side)
        mask[row, : len(side)] = True
    return values, mask


def _frozen(logps: torch.Tensor) -> FrozenModelOutputs:
    return FrozenModelOutputs(logps=logps, last_hidden=torch.zeros(*logps.shape, 1), head=nn.Identity())


# ---- TIS-DPO ---------------------------------------------------------------------------------------------------
def test_tisdpo_paper_weights_and_loss_by_hand():
    rho, mask = _pair([0.2, -0.1, 0.4, 0.0], [-0.3, 0.1, -0.5])
    d, _ = _pair([1.0, -1.0, 2.0, 0.0], [-2.0, 0.5, -0.2])
    context = TokenContext(mask, frozen={"positive": _frozen(d), "negative": _frozen(torch.zeros_like(d))})
    masks = ContrastiveImportance(eos_weight=None)(None, mask, context)  # the paper's formula on every token
    # w = exp(μ·clamp(d, −0.5, 1.5)), μ = +1 chosen, −1 rejected
    expected_w = [math.exp(1.0), math.exp(-0.5), math.exp(1.5), 1.0]
    expected_l = [math.exp(0.5), math.exp(-0.5), math.exp(0.2)]
    assert_close(masks.reward[0], torch.tensor(expected_w))
    assert_close(masks.reward[1, :3], torch.tensor(expected_l))
    assert masks.reward[1, 3] == 0
    stats = TokenStats(policy_logps=rho, reference_logps=torch.zeros_like(rho), response_mask=mask)
    out = weighted_dpo_loss(stats, masks, beta=0.1)
    u = 0.1 * (sum(w * r for w, r in zip(expected_w, [0.2, -0.1, 0.4, 0.0], strict=True))
               - sum(w * r for w, r in zip(expected_l, [-0.3, 0.1, -0.5], strict=True)))
    assert u == pytest.approx(0.3320, abs=1e-4)
    assert out.loss.item() == pytest.approx(0.5408, abs=1e-4)


def test_tisdpo_rank_weights_match_the_released_rank_map():
    """The last token of each row stands for the appended EOS: weight 0 and out of the ranking (released code)."""
    d, mask = _pair([1.0, -1.0, 2.0, 0.0], [-2.0, 0.5, -0.2])
    context = TokenContext(mask, frozen={"positive": _frozen(d), "negative": _frozen(torch.zeros_like(d))})
    masks = ContrastiveImportance(weights="rank")(None, mask, context)
    assert_close(masks.reward[0], torch.tensor([1.0, 0.7, 1.3, 0.0]))  # ranks of [1, −1, 2]; EOS 0
    assert_close(masks.reward[1, :3], torch.tensor([1.3, 0.7, 0.0]))  # scores −d = [2.0, −0.5], EOS 0
    every = ContrastiveImportance(weights="rank", eos_weight=None)(None, mask, context)
    assert_close(every.reward[0], torch.tensor([1.1, 0.7, 1.3, 0.9]))
    assert_close(every.reward[1, :3], torch.tensor([1.3, 0.7, 1.0]))
    one, one_mask = _pair([0.3, 0.5], [0.1, 0.2, 0.4])  # one token before the EOS: 1.0
    context = TokenContext(one_mask, frozen={"positive": _frozen(one), "negative": _frozen(torch.zeros_like(one))})
    assert_close(ContrastiveImportance(weights="rank")(None, one_mask, context).reward[0], torch.tensor([1.0, 0, 0]))


def _released_rank_based_transform(nums: list[float], low: float = 0.7, high: float = 1.3) -> list[float]:
    """The released ``rank_based_transform`` (per row, a stable ascending sort: equal scores, the earlier lower)."""
    order = sorted(range(len(nums)), key=lambda k: nums[k])
    out = [0.0] * len(nums)
    for i, idx in enumerate(order):
        out[idx] = 1.0 if len(nums) == 1 else low + i / (len(nums) - 1) * (high - low)
    return out


def test_tisdpo_rank_ties_and_eos_match_the_released_code_row_by_row():
    """Scores with many ties (integers), ragged rows: each row equals the released transform of its scores without
    the last token, + 0 for that token (``[0]*prompt + weight[:len-1] + [0]`` in ``tokenize_batch_element``)."""
    g = torch.Generator().manual_seed(3)
    lengths = [6, 1, 4, 7, 2, 5]
    d = torch.randint(-2, 3, (6, 8), generator=g).float()
    mask = torch.arange(8)[None, :] < torch.tensor(lengths)[:, None]
    context = TokenContext(mask, frozen={"positive": _frozen(d), "negative": _frozen(torch.zeros_like(d))})
    weights = ContrastiveImportance(weights="rank")(None, mask, context).reward
    for row, n in enumerate(lengths):
        sign = -1.0 if row >= 3 else 1.0
        expected = _released_rank_based_transform([sign * v for v in d[row, : n - 1].tolist()]) + [0.0]
        assert_close(weights[row, :n], torch.tensor(expected), msg=f"row {row}")
        assert weights[row, n:].abs().sum() == 0


def test_tisdpo_names_its_models_and_refuses_a_missing_one():
    masker = ContrastiveImportance(positive="dpo", negative="rdpo")
    assert masker.frozen_model_names() == ("dpo", "rdpo")
    with pytest.raises(ValueError, match="'dpo' and 'rdpo'"):
        masker(None, torch.ones(2, 3, dtype=torch.bool), TokenContext(torch.ones(2, 3, dtype=torch.bool)))


# ---- cDPO ------------------------------------------------------------------------------------------------------
def test_cdpo_contrastive_estimate_by_hand():
    """Vocabulary of 3: P_p = [0.6, 0.3, 0.1], P_n = [0.2, 0.7, 0.1]; s = softmax(2 log P_p − log P_n)."""
    log_p = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    log_n = torch.log(torch.tensor([0.2, 0.7, 0.1]))
    mask = torch.tensor([[False, True], [False, True]])  # one response token per row (column 1 predicts id 2)
    ids = torch.tensor([[0, 1, 1], [0, 1, 1]])
    batch = PreferenceBatch(input_ids=ids, attention_mask=torch.ones_like(ids),
                            labels=torch.tensor([[-100, -100, 1], [-100, -100, 1]]))
    # the heads return the fixed logits whatever the hidden state
    positive = FrozenModelOutputs(torch.zeros(2, 2), torch.zeros(2, 3, 1), _ConstantHead(log_p))
    negative = FrozenModelOutputs(torch.zeros(2, 2), torch.zeros(2, 3, 1), _ConstantHead(log_n))
    context = TokenContext(mask, batch=batch, frozen={"positive": positive, "negative": negative})
    masks = CriticalTokenWeights(eos_weight=None)(None, mask, context)  # the one token is also the last
    z = [2 * math.log(p) - math.log(n) for p, n in ((0.6, 0.2), (0.3, 0.7), (0.1, 0.1))]
    s = math.exp(z[1]) / sum(math.exp(v) for v in z)
    assert s == pytest.approx(0.063, abs=1e-3)
    assert masks.reward[0, 1].item() == pytest.approx(1.0)  # chosen: weight 1
    assert masks.reward[1, 1].item() == pytest.approx(1 - s, abs=1e-6)  # rejected: 1 − s
    both = CriticalTokenWeights(only_rejected=False, eos_weight=None)(None, mask, context)
    assert both.reward[0, 1].item() == pytest.approx(s, abs=1e-6)
    assert masks.reward[:, 0].abs().sum() == 0


def test_cdpo_gives_the_last_token_weight_one_like_the_released_code():
    """Released ``dpo_loss``: chosen estimates + [1], rejected 1 − (estimates + [0]): the EOS weighs 1 on both sides
    (the chosen side matters with ``only_rejected: false``); the tokens before it are unchanged."""
    log_p = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    log_n = torch.log(torch.tensor([0.2, 0.7, 0.1]))
    mask = torch.tensor([[False, True, True], [False, True, True]])
    ids = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1]])
    batch = PreferenceBatch(input_ids=ids, attention_mask=torch.ones_like(ids),
                            labels=torch.tensor([[-100, -100, 1, 1], [-100, -100, 1, 1]]))
    positive = FrozenModelOutputs(torch.zeros(2, 3), torch.zeros(2, 4, 1), _ConstantHead(log_p))
    negative = FrozenModelOutputs(torch.zeros(2, 3), torch.zeros(2, 4, 1), _ConstantHead(log_n))
    context = TokenContext(mask, batch=batch, frozen={"positive": positive, "negative": negative})
    s = (0.3**2 / 0.7) / (0.6**2 / 0.2 + 0.3**2 / 0.7 + 0.1**2 / 0.1)  # softmax(2 log P_p − log P_n)[1] = 0.0634
    rejected_only = CriticalTokenWeights()(None, mask, context).reward
    assert_close(rejected_only, torch.tensor([[0, 1, 1], [0, 1 - s, 1]]), atol=1e-4, rtol=0)
    both = CriticalTokenWeights(only_rejected=False)(None, mask, context).reward
    assert_close(both, torch.tensor([[0, s, 1], [0, 1 - s, 1]]), atol=1e-4, rtol=0)


class _ConstantHead(nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(hidden.shape[0], -1)


# ---- ConfPO ----------------------------------------------------------------------------------------------------
def test_confpo_selects_tokens_below_the_mean_probability_by_hand():
    logps, mask = _pair([-0.1, -2.3, -0.05, -1.2], [-0.5, -0.5, -3.0])
    stats = TokenStats(policy_logps=logps, response_mask=mask)
    masks = LowConfidenceSelection()(None, mask, TokenContext(mask, stats=stats))
    # chosen p = [0.905, 0.100, 0.951, 0.301], mean 0.564 → tokens 2 and 4
    assert masks.reward[0].tolist() == [0, 1, 0, 1]
    assert masks.reward[1].tolist() == [0, 0, 1, 0]
    out = masked_simpo_loss(stats, masks, beta=1.5, margin=1.6)
    logit = 1.5 * ((-2.3 - 1.2) / 2 - (-3.0)) - 1.6
    assert out.logit.item() == pytest.approx(logit, abs=1e-5)
    assert out.loss.item() == pytest.approx(softplus_neg(logit), abs=1e-5)


def test_confpo_naive_loop_on_random_rows():
    g = torch.Generator().manual_seed(0)
    logps = -torch.rand(6, 7, generator=g) * 3
    mask = torch.rand(6, 7, generator=g) > 0.3
    logps = logps * mask
    got = LowConfidenceSelection()(None, mask, TokenContext(mask, stats=TokenStats(policy_logps=logps,
                                                                                   response_mask=mask))).reward
    for i in range(6):
        probs = [math.exp(float(logps[i, t])) for t in range(7) if mask[i, t]]
        tau = sum(probs) / max(len(probs), 1)
        for t in range(7):
            assert got[i, t] == (1.0 if mask[i, t] and math.exp(float(logps[i, t])) < tau else 0.0)


# ---- SePO ------------------------------------------------------------------------------------------------------
def test_sepo_selection_and_loss_by_hand():
    chosen_s = [0.8, -0.2, 0.5, 0.1, -0.9, 0.3, 0.0, -0.4, 0.6, 0.2]
    rejected_s = [0.1, -0.7, 0.3, -0.2, 0.0, -0.5, 0.4, 0.2, 0.1, -0.1]
    score, mask = _pair(chosen_s, rejected_s)
    frozen = {"oracle": _frozen(score), "oracle_reference": _frozen(torch.zeros_like(score))}
    context = TokenContext(mask, frozen=frozen)
    masks = OracleSelection(keep_ratio=0.3)(None, mask, context)
    assert masks.reward[0].nonzero().flatten().tolist() == [0, 2, 8]  # top 3 of the chosen
    assert masks.reward[1].nonzero().flatten().tolist() == [1, 3, 5]  # bottom 3 of the rejected
    logps = torch.full((2, 10), -0.1)
    logps[0, [0, 2, 8]] = torch.tensor([-1.0, -0.2, -0.4])
    logps[1, [1, 3, 5]] = torch.tensor([-1.2, -2.0, -0.9])
    stats = TokenStats(policy_logps=logps, response_mask=mask)
    assert masked_simpo_loss(stats, masks, beta=2.1, margin=0.0).loss.item() == pytest.approx(0.160, abs=1e-3)
    assert MaskedSimPO(beta=2.1, margin=0.5)(stats, masks).loss.item() == pytest.approx(0.252, abs=1e-3)


def test_masked_simpo_identities():
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(4, 6, generator=g) > 0.2
    mask[:, 0] = True
    stats = TokenStats(policy_logps=-torch.rand(4, 6, generator=g) * mask, response_mask=mask)
    # all-ones masks: SimPO with γ = margin
    ones = TokenMasks.ones_like(mask)
    assert_close(masked_simpo_loss(stats, ones, 2.0, 1.0).loss, simpo_loss(stats, 2.0, 0.5).loss)
    # a pair with an empty selection on one side contributes 0
    empty = ones.reward.clone()
    empty[2] = 0  # the rejected row of pair 0 (rows: c0, c1, r0, r1)
    out = masked_simpo_loss(stats, TokenMasks(reward=empty, kl=empty), 2.0, 1.0)
    assert out.loss[0] == 0 and out.logit[0] == 0 and out.loss[1] > 0


# ---- TGDPO -----------------------------------------------------------------------------------------------------
def test_tgdpo_per_token_beta_by_hand():
    rho, mask = _pair([0.2, -0.1, 0.4, 0.0], [-0.3, 0.1, -0.5])
    ratio, _ = _pair([0.5, -0.3, 0.2, 0.0], [-0.4, 0.1, 0.3])  # log π_r − log π_ref
    reference = torch.zeros_like(rho)
    stats = TokenStats(policy_logps=rho, reference_logps=reference, response_mask=mask)
    context = TokenContext(mask, stats=stats, frozen={"reward": _frozen(ratio)})
    masker = TokenRewardBeta(alpha=0.5)
    masker.use_objective(WeightedDPO(beta=0.1))  # the β inside r̂ is the objective's
    masks = masker(None, mask, context)
    beta_w = [0.1 * (1 + 0.5 * 0.1 * r) for r in (0.5, -0.3, 0.2, 0.0)]
    beta_l = [0.1 * (1 - 0.5 * 0.1 * r) for r in (-0.4, 0.1, 0.3)]
    assert_close(0.1 * masks.reward[0], torch.tensor(beta_w))
    assert_close(0.1 * masks.reward[1, :3], torch.tensor(beta_l))
    out = WeightedDPO(beta=0.1)(stats, masks)
    arg = (sum(b * r for b, r in zip(beta_w, [0.2, -0.1, 0.4, 0.0], strict=True))
           - sum(b * r for b, r in zip(beta_l, [-0.3, 0.1, -0.5], strict=True)))
    assert arg == pytest.approx(0.12095, abs=1e-5)
    assert out.loss.item() == pytest.approx(0.6345, abs=1e-4)


def test_tgdpo_beta_comes_from_the_objective_and_a_mismatch_is_refused():
    masker = TokenRewardBeta()
    masker.use_objective(WeightedDPO(beta=0.3))
    assert masker.beta == 0.3
    TokenRewardBeta(beta=0.3).use_objective(WeightedDPO(beta=0.3))  # equal: accepted
    with pytest.raises(ConfigError, match=r"beta=0.2 differs from the objective's beta=0.1.*remove the masker's beta"):
        TokenRewardBeta(beta=0.2).use_objective(WeightedDPO(beta=0.1))


def test_weighted_dpo_naive_loop():
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(6, 5, generator=g) > 0.3
    policy, reference = torch.randn(6, 5, generator=g) * mask, torch.randn(6, 5, generator=g) * mask
    weights = torch.rand(6, 5, generator=g) * mask
    stats = TokenStats(policy_logps=policy, reference_logps=reference, response_mask=mask)
    out = weighted_dpo_loss(stats, TokenMasks(reward=weights, kl=weights), beta=0.3)
    for i in range(3):
        chosen = sum(float(weights[i, t] * (policy[i, t] - reference[i, t])) for t in range(5) if mask[i, t])
        rejected = sum(float(weights[3 + i, t] * (policy[3 + i, t] - reference[3 + i, t])) for t in range(5)
                       if mask[3 + i, t])
        assert out.loss[i].item() == pytest.approx(softplus_neg(0.3 * (chosen - rejected)), abs=1e-5)
        assert out.chosen_reward[i].item() == pytest.approx(0.3 * chosen, abs=1e-5)
