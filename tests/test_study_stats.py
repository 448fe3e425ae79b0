"""Study statistics: Pareto fronts, frontier areas, bootstrap, Spearman; hand-computed numbers and naive loops."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sparsepo_lightning.study import stats


def test_pareto_front_keeps_non_dominated_points_sorted_by_kl():
    kl = [0.5, 0.2, 0.9, 0.3, 0.2]
    reward = [0.4, 0.1, 0.3, 0.5, 0.2]
    xs, ys = stats.pareto_front(kl, reward)
    # (0.2, 0.2) beats (0.2, 0.1); (0.3, 0.5) dominates (0.5, 0.4) and (0.9, 0.3)
    assert xs.tolist() == [0.2, 0.3] and ys.tolist() == [0.2, 0.5]


def test_pareto_front_matches_a_naive_dominance_check():
    rng = np.random.default_rng(0)
    kl, reward = rng.random(30), rng.random(30)
    xs, ys = stats.pareto_front(kl, reward)
    naive = sorted((k, r) for k, r in zip(kl, reward, strict=True)
                   if not any((k2 <= k and r2 > r) for k2, r2 in zip(kl, reward, strict=True)))
    assert list(zip(xs.tolist(), ys.tolist(), strict=True)) == naive


def test_frontier_area_by_hand():
    # anchor (0, 0.1); runs (1, 0.5), (2, 0.7): mean over [0, 2] of the piecewise-linear curve
    xs, ys = stats.frontier_curve([1.0, 2.0], [0.5, 0.7], (0.0, 0.1))
    area = (0.1 + 0.5) / 2 * 1 + (0.5 + 0.7) / 2 * 1
    assert stats.mean_reward_over_kl(xs, ys, 2.0) == pytest.approx(area / 2, abs=1e-9)
    assert stats.mean_reward_over_kl(xs, ys, 1.0) == pytest.approx(0.3, abs=1e-9)
    with pytest.raises(ValueError, match="beyond"):
        stats.mean_reward_over_kl(xs, ys, 2.5)


def test_negative_kl_estimates_are_clipped_to_zero():
    xs, ys = stats.frontier_curve([-0.01, 1.0], [0.3, 0.5], (0.0, 0.1))
    assert xs[0] == 0.0 and ys[0] == 0.3  # the run at KL ~0 beats the anchor


def test_frontier_scores_use_the_common_kl_range():
    points = {"a": (np.array([1.0, 3.0]), np.array([0.5, 0.6])), "b": (np.array([2.0]), np.array([0.9]))}
    scores, kl_max = stats.frontier_scores(points, (0.0, 0.0))
    assert kl_max == 2.0  # b reaches only KL 2
    assert scores["b"] == pytest.approx(0.45, abs=1e-9)  # mean of the line 0 -> 0.9 over [0, 2]
    # a: 0 -> 0.5 on [0, 1], 0.5 -> 0.55 on [1, 2]
    assert scores["a"] == pytest.approx(((0 + 0.5) / 2 + (0.5 + 0.55) / 2) / 2, abs=1e-9)


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(1)
    prompts = 50
    anchor = rng.normal(0.1, 0.1, prompts)
    per_prompt = {
        "good": [(rng.normal(1.0, 0.2, prompts), anchor + 0.5 + rng.normal(0, 0.1, prompts))],
        "bad": [(rng.normal(1.0, 0.2, prompts), anchor + 0.1 + rng.normal(0, 0.1, prompts))],
    }
    estimate, samples, _ = stats.bootstrap_frontier_scores(per_prompt, anchor, num_resamples=200, seed=3)
    again, samples_again, _ = stats.bootstrap_frontier_scores(per_prompt, anchor, num_resamples=200, seed=3)
    assert estimate == again and all(np.array_equal(samples[m], samples_again[m]) for m in samples)
    low, high = stats.interval(samples["good"] - samples["bad"])
    assert 0 < low <= estimate["good"] - estimate["bad"] <= high


def test_ranks_average_ties():
    assert stats.ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [2.5, 0.0, 2.5, 1.0]


def test_spearman_matches_the_textbook_formula_without_ties():
    rng = np.random.default_rng(2)
    x, y = rng.permutation(20).astype(float), rng.permutation(20).astype(float)
    d = stats.ranks(x) - stats.ranks(y)
    expected = 1 - 6 * (d**2).sum() / (20 * (20**2 - 1))
    assert stats.spearman(x, y) == pytest.approx(expected, abs=1e-12)
    assert stats.spearman(x, 2 * x + 1) == pytest.approx(1.0)
    assert np.isnan(stats.spearman(x, np.zeros(20)))


def test_permutation_p_value_separates_signal_from_noise():
    rng = np.random.default_rng(4)
    x = rng.random(60)
    rho, p = stats.spearman_permutation(x, x + rng.normal(0, 0.05, 60), 500, seed=0)
    assert rho > 0.9 and p == pytest.approx(1 / 501)
    _, p_noise = stats.spearman_permutation(x, rng.random(60), 500, seed=0)
    assert p_noise > 0.01


def test_permutation_p_value_is_exact_on_a_tiny_sample():
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 2.0, 4.0])
    rho = stats.spearman(x, y)
    perms = [stats.spearman(np.array(p), y) for p in itertools.permutations(x)]
    exact = np.mean([abs(r) >= abs(rho) - 1e-12 for r in perms])
    _, p = stats.spearman_permutation(x, y, 20000, seed=0)
    assert p == pytest.approx(exact, abs=0.02)
