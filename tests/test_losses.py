"""Every objective against hand-computed numbers, identities between objectives, and a naive per-row loop.

The hand case (B = 2 pairs, 3 columns; column 3 of the chosen row of pair 1 is padding holding garbage):

pair 1, chosen:   policy logps [-1.0, -2.0], reference [-1.5, -1.8]   -> rho = [0.5, -0.2],  sum 0.3
                  KL [0.1, 0.3]                                       -> sum 0.4,  length 2, sum logp -3.0
pair 1, rejected: policy [-2.0, -0.5, -1.0], reference [-1.6, -0.6, -0.7] -> rho = [-0.4, 0.1, -0.3], sum -0.6
                  KL [0.2, 0.05, 0.25]                                -> sum 0.5,  length 3, sum logp -3.5
pair 2, chosen:   policy [-1.0], reference [-0.8] -> rho -0.2, KL 0.05, length 1
pair 2, rejected: policy [-1.0], reference [-1.1] -> rho  0.1, KL 0.0,  length 1
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from sparsepo_lightning import losses
from sparsepo_lightning.objectives import DPO, DPOP, IPO, TDPO1, TDPO2, SimPO, SparsePO
from sparsepo_lightning.types import TokenMasks, TokenStats

GARBAGE = 9.0


def softplus_neg(x: float) -> float:
    """-log sigmoid(x) = log(1 + exp(-x))."""
    return math.log1p(math.exp(-x))


def hand_stats(requires_grad: bool = False) -> TokenStats:
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    policy = torch.tensor([[-1.0, -2.0, GARBAGE], [-1.0, 0, 0], [-2.0, -0.5, -1.0], [-1.0, 0, 0]])
    reference = torch.tensor([[-1.5, -1.8, -GARBAGE], [-0.8, 0, 0], [-1.6, -0.6, -0.7], [-1.1, 0, 0]])
    kl = torch.tensor([[0.1, 0.3, GARBAGE], [0.05, 0, 0], [0.2, 0.05, 0.25], [0.0, 0, 0]])
    return TokenStats(policy.requires_grad_(requires_grad), reference, kl.requires_grad_(requires_grad),
                      response_mask=mask)


def hand_masks(independent: bool = False) -> TokenMasks:
    reward = torch.tensor([[1.0, 0.0, GARBAGE], [1.0, 0, 0], [0.5, 0.0, 2.0], [1.0, 0, 0]])
    if not independent:
        return TokenMasks(reward=reward, kl=reward, common=True, learned=True)
    kl = torch.tensor([[0.0, 1.0, GARBAGE], [1.0, 0, 0], [1.0, 1.0, 0.0], [1.0, 0, 0]])
    return TokenMasks(reward=reward, kl=kl, common=False, learned=True)


def test_dpo_hand_computed():
    """beta 0.5. Pair 1: logit = 0.5 (0.3 - (-0.6)) = 0.45, loss = log(1 + e^-0.45).
    Pair 2: logit = 0.5 (-0.2 - 0.1) = -0.15. Rewards beta*sum rho: (0.15, -0.3) and (-0.1, 0.05)."""
    out = DPO(beta=0.5)(hand_stats(), None)
    assert_close(out.logit, torch.tensor([0.45, -0.15]))
    assert_close(out.loss, torch.tensor([softplus_neg(0.45), softplus_neg(-0.15)]))
    assert_close(out.chosen_reward, torch.tensor([0.15, -0.1]))
    assert_close(out.rejected_reward, torch.tensor([-0.3, 0.05]))


def test_ipo_hand_computed():
    """beta 0.5 -> target 1/(2 beta) = 1. h = 0.9 and -0.3: loss (0.9-1)^2 = 0.01 and (-0.3-1)^2 = 1.69."""
    out = IPO(beta=0.5)(hand_stats(), None)
    assert_close(out.logit, torch.tensor([0.9, -0.3]))
    assert_close(out.loss, torch.tensor([0.01, 1.69]))


def test_simpo_hand_computed():
    """beta 2, gamma/beta 0.5 -> gamma = 1. Pair 1: r_w = 2(-3.0/2) = -3, r_l = 2(-3.5/3) = -7/3,
    logit = -3 + 7/3 - 1 = -5/3. Pair 2: r_w = 2(-1) = -2, r_l = -2, logit = -1."""
    out = SimPO(beta=2.0, gamma_beta_ratio=0.5)(hand_stats(), None)
    assert_close(out.chosen_reward, torch.tensor([-3.0, -2.0]))
    assert_close(out.rejected_reward, torch.tensor([-7 / 3, -2.0]))
    assert_close(out.logit, torch.tensor([-5 / 3, -1.0]))
    assert_close(out.loss, torch.tensor([softplus_neg(-5 / 3), softplus_neg(-1.0)]))


def test_dpop_hand_computed():
    """beta 0.5, lambda 50. Pair 1: sum rho_w = 0.3 > 0, no penalty, logit 0.45 (= DPO).
    Pair 2: sum rho_w = -0.2 -> penalty 50*0.2 = 10, logit = 0.5(-0.2 - 0.1 - 10) = -5.15."""
    out = DPOP(beta=0.5, lambda_=50.0)(hand_stats(), None)
    assert_close(out.logit, torch.tensor([0.45, -5.15]))
    assert_close(out.loss, torch.tensor([softplus_neg(0.45), softplus_neg(-5.15)]))


def test_tdpo1_hand_computed():
    """beta 0.5. Pair 1: logit = 0.5 (0.3 + 0.6 + 0.4 - 0.5) = 0.4; rewards 0.5(0.3+0.4) = 0.35, 0.5(-0.6+0.5) = -0.05.
    Pair 2: logit = 0.5 (-0.2 - 0.1 + 0.05 - 0) = -0.125."""
    out = TDPO1(beta=0.5)(hand_stats(), None)
    assert_close(out.logit, torch.tensor([0.4, -0.125]))
    assert_close(out.loss, torch.tensor([softplus_neg(0.4), softplus_neg(-0.125)]))
    assert_close(out.chosen_reward, torch.tensor([0.35, -0.075]))
    assert_close(out.rejected_reward, torch.tensor([-0.05, 0.05]))
    assert_close(out.chosen_reward - out.rejected_reward, out.logit)


def test_tdpo2_hand_computed_and_stop_gradient():
    """beta 0.5, alpha 0.5. Pair 1: logit = 0.5 (0.9 + 0.5 (0.4 - 0.5)) = 0.425.
    Pair 2: 0.5 (-0.3 + 0.5 (0.05 - 0)) = -0.1375. d logit / d KL_w = 0 (stop-gradient),
    d logit / d KL_l^t = -beta alpha = -0.25 on rejected response tokens."""
    stats = hand_stats(requires_grad=True)
    out = TDPO2(beta=0.5, alpha=0.5)(stats, None)
    assert_close(out.logit, torch.tensor([0.425, -0.1375]))
    (grad,) = torch.autograd.grad(out.logit.sum(), stats.kl)
    expected = torch.tensor([[0, 0, 0], [0, 0, 0], [-0.25, -0.25, -0.25], [-0.25, 0, 0]])
    assert_close(grad, expected)


def test_sparsepo_common_hand_computed():
    """beta 0.5, lambda_u 0.1, lambda_d 0.3, common masks m_w = [1, 0], m_l = [0.5, 0, 2] (pair 1), [1] / [1] (pair 2).
    Pair 1: U = (1*0.5 + 0*(-0.2)) - (0.5*(-0.4) + 0*0.1 + 2*(-0.3)) = 0.5 + 0.8 = 1.3;
    K_w = 1*0.1 = 0.1; K_l = 0.5*0.2 + 2*0.25 = 0.6; logit = 0.5 (1.3 + 0.1 - 0.6) = 0.4.
    L1 mass = (1 + 0) + (0.5 + 0 + 2) = 3.5; common + both masks on -> lambdas halved:
    penalty = (0.1/2 + 0.3/2) * 3.5 = 0.7. loss = log(1 + e^-0.4) + 0.7.
    Pair 2 (masks 1): logit = 0.5 (-0.2 - 0.1 + 0.05) = -0.125, penalty = 0.2 * 2 = 0.4."""
    out = SparsePO(beta=0.5, l1_reward=0.1, l1_kl=0.3)(hand_stats(), hand_masks())
    assert_close(out.logit, torch.tensor([0.4, -0.125]))
    assert_close(out.penalty, torch.tensor([0.7, 0.4]))
    assert_close(out.loss, torch.tensor([softplus_neg(0.4) + 0.7, softplus_neg(-0.125) + 0.4]))
    assert_close(out.chosen_reward - out.rejected_reward, out.logit)  # the §1.3 sign fix


def test_sparsepo_independent_hand_computed():
    """Same reward mask; KL mask m_d,w = [0, 1], m_d,l = [1, 1, 0] (pair 1), [1] / [1] (pair 2), no halving.
    Pair 1: K_w = 0.3, K_l = 0.2 + 0.05 = 0.25, logit = 0.5 (1.3 + 0.3 - 0.25) = 0.675;
    penalty = 0.1 * 3.5 + 0.3 * (1 + 2) = 1.25. Pair 2: logit -0.125, penalty 0.1*2 + 0.3*2 = 0.8."""
    out = SparsePO(beta=0.5, l1_reward=0.1, l1_kl=0.3)(hand_stats(), hand_masks(independent=True))
    assert_close(out.logit, torch.tensor([0.675, -0.125]))
    assert_close(out.penalty, torch.tensor([1.25, 0.8]))
    assert_close(out.loss, torch.tensor([softplus_neg(0.675) + 1.25, softplus_neg(-0.125) + 0.8]))


def test_sparsepo_mask_gradient_hand_computed():
    """d loss / d m_u,w^t = -sigma(-logit) * beta * rho_w^t + lambda_u' (mask also feeds m_d when common:
    + -sigma(-logit) * beta * KL_w^t + lambda_d'). Pair 1, common, beta 0.5, lambdas 0.1/0.3 (halved to 0.05/0.15):
    sigma(-0.4) = 0.401312; token 1: -0.401312*0.5*(0.5 + 0.1) + 0.2 = 0.0796063."""
    masks = hand_masks()
    reward = masks.reward.clone().requires_grad_(True)
    out = SparsePO(beta=0.5, l1_reward=0.1, l1_kl=0.3)(hand_stats(), TokenMasks(reward, reward, common=True))
    (grad,) = torch.autograd.grad(out.loss[0], reward)
    s = 1 / (1 + math.exp(0.4))
    assert_close(grad[0, 0], torch.tensor(-s * 0.5 * (0.5 + 0.1) + 0.2))
    assert_close(grad[0, 2], torch.tensor(0.0))  # padding gets no gradient


def random_stats(n_pairs: int = 5, length: int = 7, seed: int = 0, requires_grad: bool = False) -> TokenStats:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (2 * n_pairs,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    policy = -torch.rand(2 * n_pairs, length, generator=g) * 3
    reference = -torch.rand(2 * n_pairs, length, generator=g) * 3
    kl = torch.rand(2 * n_pairs, length, generator=g)
    return TokenStats((policy * mask).requires_grad_(requires_grad), reference * mask,
                      (kl * mask).requires_grad_(requires_grad), response_mask=mask)


def random_masks(stats: TokenStats, independent: bool, seed: int = 1) -> TokenMasks:
    g = torch.Generator().manual_seed(seed)
    shape = stats.response_mask.shape
    reward = torch.relu(torch.randn(shape, generator=g)) * stats.response_mask
    kl = torch.relu(torch.randn(shape, generator=g)) * stats.response_mask if independent else reward
    return TokenMasks(reward, kl, common=not independent, learned=True)


def test_sparsepo_uniform_masks_equal_tdpo1_exactly():
    stats = random_stats()
    sparse = SparsePO(beta=0.3)(stats, TokenMasks.ones_like(stats.response_mask))
    tdpo = TDPO1(beta=0.3)(stats, None)
    assert torch.equal(sparse.loss, tdpo.loss)
    assert torch.equal(sparse.logit, tdpo.logit)


def test_sparsepo_zero_kl_unit_masks_equal_dpo():
    stats = random_stats()
    stats.kl = torch.zeros_like(stats.kl)
    sparse = SparsePO(beta=0.3)(stats, TokenMasks.ones_like(stats.response_mask))
    dpo = DPO(beta=0.3)(stats, None)
    assert_close(sparse.loss, dpo.loss)
    assert_close(sparse.logit, dpo.logit)


def test_sparsepo_switches_off_equal_tdpo1_whatever_the_masks():
    stats = random_stats()
    sparse = SparsePO(beta=0.3, mask_on_reward=False, mask_on_kl=False)(stats, random_masks(stats, True))
    assert_close(sparse.loss, TDPO1(beta=0.3)(stats, None).loss)


@pytest.mark.parametrize("independent", [False, True])
@pytest.mark.parametrize("switches", [(True, True), (True, False), (False, True)])
def test_sparsepo_matches_naive_per_row_loop(independent, switches):
    on_reward, on_kl = switches
    stats = random_stats(seed=3)
    masks = random_masks(stats, independent)
    beta, lam_u, lam_d = 0.7, 0.01 if on_reward else 0.0, 0.02 if on_kl else 0.0
    out = losses.sparsepo_loss(stats, masks, beta, lam_u, lam_d, on_reward, on_kl)
    n = stats.num_pairs
    halve = 0.5 if (not independent and on_reward and on_kl) else 1.0
    for i in range(n):
        sides = []
        for row in (i, i + n):
            u = k = mass_u = mass_d = 0.0
            for t in range(stats.response_mask.shape[1]):
                if not stats.response_mask[row, t]:
                    continue
                rho = float(stats.policy_logps[row, t] - stats.reference_logps[row, t])
                m_u = float(masks.reward[row, t]) if on_reward else 1.0
                m_d = float(masks.kl[row, t]) if on_kl else 1.0
                u += m_u * rho
                k += m_d * float(stats.kl[row, t])
                mass_u += abs(m_u)
                mass_d += abs(m_d)
            sides.append((u, k, mass_u, mass_d))
        (u_w, k_w, mu_w, md_w), (u_l, k_l, mu_l, md_l) = sides
        logit = beta * (u_w - u_l + k_w - k_l)
        penalty = halve * (lam_u * (mu_w + mu_l) * on_reward + lam_d * (md_w + md_l) * on_kl)
        assert_close(out.logit[i], torch.tensor(logit), rtol=1e-5, atol=1e-6)
        assert_close(out.loss[i], torch.tensor(softplus_neg(logit) + penalty), rtol=1e-5, atol=1e-6)


def test_tokenstats_cat_and_split_roundtrip():
    stats = random_stats(n_pairs=3)
    tensors = (stats.policy_logps, stats.reference_logps, stats.kl)
    chosen = TokenStats(*(t[:3] for t in tensors), response_mask=stats.response_mask[:3])
    rejected = TokenStats(*(t[3:] for t in tensors), response_mask=stats.response_mask[3:])
    joined = TokenStats.cat(chosen, rejected)
    assert_close(losses.tdpo1_loss(joined, 0.1).loss, losses.tdpo1_loss(stats, 0.1).loss)


def test_sparsepo_rejects_penalty_on_disabled_mask():
    with pytest.raises(ValueError, match="mask_on_kl"):
        SparsePO(l1_kl=0.1, mask_on_kl=False)
    with pytest.raises(ValueError, match="beta"):
        DPO(beta=0.0)


def test_pure_sparsepo_loss_refuses_what_the_objective_refuses():
    stats, masks = hand_stats(), hand_masks(independent=True)
    with pytest.raises(ValueError, match="mask_on_kl"):
        losses.sparsepo_loss(stats, masks, beta=0.5, l1_kl=0.1, mask_on_kl=False)
    with pytest.raises(ValueError, match="l1_reward must be >= 0"):
        losses.sparsepo_loss(stats, masks, beta=0.5, l1_reward=-0.1)
    for loss in (losses.dpo_loss, losses.ipo_loss, losses.tdpo1_loss):
        with pytest.raises(ValueError, match="beta must be > 0"):
            loss(stats, 0.0)
    with pytest.raises(ValueError, match="beta must be > 0"):
        losses.sparsepo_loss(stats, masks, beta=-1.0)


def test_common_is_read_from_the_tensors_and_a_contradiction_raises():
    reward = torch.rand(4, 3)
    assert TokenMasks(reward=reward, kl=reward).common
    assert TokenMasks(reward=reward, kl=reward.detach()).common  # same memory
    assert not TokenMasks(reward=reward, kl=reward.clone()).common
    with pytest.raises(ValueError, match="two different tensors"):
        TokenMasks(reward=reward, kl=reward.clone(), common=True)
    with pytest.raises(ValueError, match="one tensor"):
        TokenMasks(reward=reward, kl=reward, common=False)


def test_independent_masks_with_equal_values_are_not_halved():
    """Two separately built masks with equal values are independent: each λ applies in full (no halving)."""
    stats, common = hand_stats(), hand_masks()
    twins = TokenMasks(reward=common.reward, kl=common.reward.clone())
    halved = losses.sparsepo_loss(stats, common, beta=0.5, l1_reward=0.1, l1_kl=0.3)
    full = losses.sparsepo_loss(stats, twins, beta=0.5, l1_reward=0.1, l1_kl=0.3)
    assert_close(full.penalty, 2 * halved.penalty)
    assert_close(full.logit, halved.logit)


def test_objectives_without_kl_or_reference_need_no_such_tensors():
    full = hand_stats()
    no_kl = TokenStats(full.policy_logps, full.reference_logps, response_mask=full.response_mask)
    policy_only = TokenStats(policy_logps=full.policy_logps, response_mask=full.response_mask)
    for loss in (losses.dpo_loss, losses.ipo_loss):
        assert_close(loss(no_kl, 0.5).loss, loss(full, 0.5).loss)
    assert_close(losses.dpop_loss(no_kl, 0.5, 50.0).loss, losses.dpop_loss(full, 0.5, 50.0).loss)
    assert_close(losses.simpo_loss(policy_only, 2.0, 0.5).loss, losses.simpo_loss(full, 2.0, 0.5).loss)
    with pytest.raises(ValueError, match="TokenStats.kl"):
        losses.tdpo1_loss(no_kl, 0.5)
    with pytest.raises(ValueError, match="TokenStats.reference_logps"):
        losses.dpo_loss(policy_only, 0.5)


def test_uniform_masker_needs_no_reference():
    from sparsepo_lightning.masks import UniformMasker

    mask = hand_stats().response_mask
    masks = UniformMasker()(response_mask=mask)
    assert masks.common and torch.equal(masks.reward, mask.float())


def test_tdpo_variants_are_named():
    stats = hand_stats()
    assert_close(losses.tdpo1_loss(stats, 0.5).loss, TDPO1(beta=0.5)(stats, None).loss)
    assert_close(losses.tdpo2_loss(stats, 0.5, alpha=0.5).loss, TDPO2(beta=0.5, alpha=0.5)(stats, None).loss)
    assert not torch.allclose(losses.tdpo2_loss(stats, 0.5).loss, losses.tdpo1_loss(stats, 0.5).loss)
