"""Study statistics: Pareto fronts, frontier areas, bootstrap, Spearman; the plan statistics (hierarchical bootstrap,
flat extension, Holm, p floors, resolution, regression, Student's t); hand-computed numbers and naive loops."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sparsepo_lightning.study import inference, stats


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


# ---- the plan statistics (study/inference.py) ----------------------------------------------------------------

def test_a_frontier_short_of_the_range_is_extended_flat_by_hand():
    # anchor (0, 0.1), one run at (1, 0.5): over [0, 2] the line 0.1 -> 0.5 on [0, 1], then flat 0.5 on [1, 2]
    score, short = inference.frontier_score(np.array([1.0]), np.array([0.5]), 0.1, 2.0)
    assert score == pytest.approx(((0.1 + 0.5) / 2 * 1 + 0.5 * 1) / 2, abs=1e-9)
    assert short == pytest.approx(0.5)
    score, short = inference.frontier_score(np.array([1.0, 3.0]), np.array([0.5, 0.7]), 0.1, 2.0)
    assert score == pytest.approx(((0.1 + 0.5) / 2 + (0.5 + 0.6) / 2) / 2, abs=1e-9) and short == 0.0


def test_front_reach_is_the_smallest_seed_front():
    seeds = [(np.array([[1.0, 1.0], [2.0, 2.0]]), np.array([[0.3, 0.3], [0.4, 0.4]])),
             (np.array([[1.5, 1.5], [3.0, 3.0]]), np.array([[0.5, 0.5], [0.2, 0.2]]))]  # KL 3 is dominated
    assert inference.front_reach(seeds, 0.0) == 1.5


def test_the_share_of_the_range_before_a_fronts_first_run():
    # anchor reward 0.1; seed 1: runs at KL 0.5 (reward 0.3) and 1.5 (0.4): the first point is at 0.5 of [0, 2]
    # seed 2: a run at KL 0.2 below the anchor (dominated) and one at 1.0: the front's first point is KL 1.0;
    # seed 3: its only run is beyond the range: the whole range is the line from the reference
    seeds = [(np.array([[0.5, 0.5], [1.5, 1.5]]), np.array([[0.3, 0.3], [0.4, 0.4]])),
             (np.array([[0.2, 0.2], [1.0, 1.0]]), np.array([[0.05, 0.05], [0.2, 0.2]])),
             (np.array([[3.0, 3.0]]), np.array([[0.5, 0.5]]))]
    np.testing.assert_allclose(inference.first_point_share(seeds, 0.1, 2.0), [0.25, 0.5, 1.0])


def _naive_hierarchical(points, anchor, kl_max, num_resamples, seed, crossed=False):
    """Seeds, then prompts within each drawn seed (crossed: one prompt draw for all of a resample's seeds), with
    explicit loops (the same draws)."""
    num_seeds, num_prompts = len(next(iter(points.values()))), len(anchor)
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(0, num_seeds, (num_resamples, num_seeds))
    if crossed:
        shared = rng.integers(0, num_prompts, (num_resamples, num_prompts))
        prompt_draws = [[shared[b] for _ in range(num_seeds)] for b in range(num_resamples)]
    else:
        prompt_draws = rng.integers(0, num_prompts, (num_resamples, num_seeds, num_prompts))
    out = {}
    for arm, per_seed in points.items():
        samples = []
        for b in range(num_resamples):
            scores = []
            for k in range(num_seeds):
                kl, reward = per_seed[seed_draws[b, k]]
                prompts = prompt_draws[b][k]
                kl_means = [sum(kl[j, p] for p in prompts) / num_prompts for j in range(kl.shape[0])]
                reward_means = [sum(reward[j, p] for p in prompts) / num_prompts for j in range(kl.shape[0])]
                base = sum(anchor[p] for p in prompts) / num_prompts
                front_kl, front_reward = stats.frontier_curve(kl_means, reward_means, (0.0, base))
                grid = np.linspace(0.0, kl_max, 513)
                curve = [front_reward[-1] if x > front_kl[-1] else np.interp(x, front_kl, front_reward) for x in grid]
                scores.append(np.trapezoid(curve, grid) / kl_max)
            samples.append(np.mean(scores))
        out[arm] = np.array(samples)
    return out


def _seed_data(rng, seeds=3, points=4, prompts=12, lift=0.0):
    anchor = rng.normal(0.1, 0.1, prompts)
    data = []
    for s in range(seeds):
        kl = np.abs(rng.normal(np.linspace(0.2, 1.0 + 0.3 * s, points)[:, None], 0.3, (points, prompts)))
        reward = anchor + 0.2 * kl + lift + 0.05 * s + rng.normal(0, 0.1, (points, prompts))
        data.append((kl, reward))
    return data, anchor


def _two_arms(seed):
    """Two arms of three seeds (the second lifted by 0.05), the reference's rewards and the range both fronts reach."""
    rng = np.random.default_rng(seed)
    a, anchor = _seed_data(rng)
    b, _ = _seed_data(rng, lift=0.05)
    points = {"a": a, "b": b}
    return points, anchor, min(inference.front_reach(p, float(anchor.mean())) for p in points.values())


def test_hierarchical_bootstrap_matches_a_naive_loop_and_counts_the_extended_fronts():
    points, anchor, kl_max = _two_arms(5)
    boot = inference.hierarchical_bootstrap(points, anchor, kl_max, num_resamples=40, seed=7)
    naive = _naive_hierarchical(points, anchor, kl_max, 40, 7)
    for arm in points:
        np.testing.assert_allclose(boot.samples[arm], naive[arm], rtol=0, atol=1e-12)
        expected = np.mean([inference.frontier_score(kl.mean(-1), r.mean(-1), float(anchor.mean()), kl_max)[0]
                            for kl, r in points[arm]])
        assert boot.estimate[arm] == pytest.approx(expected, abs=1e-12)
        for i, (kl, r) in enumerate(points[arm]):  # each seed's own score, in the seeds' order
            assert boot.per_seed[arm][i] == inference.frontier_score(kl.mean(-1), r.mean(-1), float(anchor.mean()),
                                                                     kl_max)[0]
    # the range is where every full-data front reaches; some resampled fronts fall short and are extended flat
    assert 0 < boot.extended < 1 and 0 < boot.extended_range < 1
    again = inference.hierarchical_bootstrap(points, anchor, kl_max, num_resamples=40, seed=7)
    assert all(np.array_equal(again.samples[m], boot.samples[m]) for m in points)


def test_the_crossed_bootstrap_matches_a_naive_loop_with_one_prompt_draw_shared_by_the_seeds():
    points, anchor, kl_max = _two_arms(6)
    crossed = inference.hierarchical_bootstrap(points, anchor, kl_max, num_resamples=40, seed=7, prompts="crossed")
    naive = _naive_hierarchical(points, anchor, kl_max, 40, 7, crossed=True)
    nested = inference.hierarchical_bootstrap(points, anchor, kl_max, num_resamples=40, seed=7)
    for arm in points:
        np.testing.assert_allclose(crossed.samples[arm], naive[arm], rtol=0, atol=1e-12)
        assert crossed.estimate[arm] == nested.estimate[arm]  # the point estimate does not resample
        assert not np.allclose(crossed.samples[arm], nested.samples[arm])
    with pytest.raises(ValueError, match="'nested' or 'crossed'"):
        inference.hierarchical_bootstrap(points, anchor, kl_max, num_resamples=4, prompts="within")


def test_a_prompt_effect_shared_by_the_seeds_is_averaged_away_by_the_nested_bootstrap_only():
    rng = np.random.default_rng(11)
    prompts, num_seeds = 60, 4
    anchor = np.zeros(prompts)
    effect = rng.normal(1.0, 0.5, prompts)  # each prompt's reward lift, the same in every seed: no seed variance at all
    seeds = [(np.full((1, prompts), 1.0), effect[None, :].copy()) for _ in range(num_seeds)]
    nested = inference.hierarchical_bootstrap({"x": seeds}, anchor, 1.0, num_resamples=2000, seed=0)
    crossed = inference.hierarchical_bootstrap({"x": seeds}, anchor, 1.0, num_resamples=2000, seed=0,
                                               prompts="crossed")
    # the score is the mean of the line from (0, 0) to (1, mean effect): mean effect / 2. Over one shared prompt draw
    # its SE is sd(effect) / (2 √P); nested, the S seeds' independent draws average it to that / √S
    expected = effect.std() / (2 * np.sqrt(prompts))
    assert crossed.samples["x"].std() == pytest.approx(expected, rel=0.1)
    assert nested.samples["x"].std() == pytest.approx(expected / np.sqrt(num_seeds), rel=0.1)


def test_hierarchical_intervals_include_the_seed_variance_that_a_prompt_bootstrap_misses():
    rng = np.random.default_rng(3)
    prompts = 40
    anchor = rng.normal(0.1, 0.05, prompts)
    # one arm whose seeds disagree a lot (offsets -0.2, 0, 0.2), the same prompt noise in every seed
    seeds = [(np.full((2, prompts), [[0.5], [1.0]]) + rng.normal(0, 0.01, (2, prompts)),
              anchor + offset + rng.normal(0, 0.02, (2, prompts))) for offset in (-0.2, 0.0, 0.2)]
    boot = inference.hierarchical_bootstrap({"x": seeds}, anchor, 0.5, num_resamples=300, seed=0)
    one_seed = inference.hierarchical_bootstrap({"x": seeds[1:2]}, anchor, 0.5, num_resamples=300, seed=0)
    # per seed the score is ≈ the anchor + 0 (offset −0.2: dominated by the anchor), + 0 (offset 0), + 0.1 (the mean
    # of the line from the anchor to +0.2 over [0, 0.5]); their spread over seed draws dwarfs the prompt noise
    assert boot.samples["x"].std() > 2.5 * one_seed.samples["x"].std()


def test_holm_against_hand_numbers():
    # sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> monotone 0.06)
    assert inference.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert inference.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1 and kept monotone
    assert inference.holm([0.02]) == pytest.approx([0.02])  # one comparison: unchanged


def test_bootstrap_p_and_the_floor_written_as_an_upper_bound():
    # 3 of 9 resamples at or below 0: 2 (1 + 3) / 10 = 0.8; none below: the floor 2 / 10
    assert inference.bootstrap_p(np.array([-1, -0.5, 0, 1, 2, 3, 4, 5, 6.0])) == pytest.approx(0.8)
    assert inference.bootstrap_p(np.arange(1, 10.0)) == pytest.approx(0.2)
    assert inference.format_p(1 / 1001, 1 / 1001) == "≤ 0.001"
    assert inference.format_p(0.0123, 1 / 1001) == "0.012" and inference.format_p(float("nan"), 0.1) == "–"


def test_resolution_is_2_8_standard_errors_at_80_percent_power():
    # z_0.975 = 1.959964, z_0.8 = 0.841621
    assert inference.resolution(0.01) == pytest.approx(0.02801585, abs=1e-7)
    assert inference.resolution(0.01, alpha=0.01, power=0.9) == pytest.approx((2.575829 + 1.281552) * 0.01, abs=1e-6)


def test_regression_recovers_arm_seed_and_kl_terms_and_its_standard_errors():
    arms = ["a", "a", "b", "b", "a", "b", "a", "b"]
    seeds = [0, 0, 0, 0, 1, 1, 1, 1]
    kl = np.array([0.2, 0.8, 0.3, 0.9, 0.4, 0.5, 1.0, 0.1])
    truth = {"a": 0.1, "b": 0.05}
    exact = [truth[a] + 0.02 * s + 0.3 * k for a, s, k in zip(arms, seeds, kl, strict=True)]
    fit = inference.regression(arms, seeds, kl, exact)
    assert fit.arms == pytest.approx(truth) and fit.slope == pytest.approx(0.3)
    assert fit.difference("a", "b") == pytest.approx((0.05, 0.0), abs=1e-7) and fit.dof == 8 - 4
    noisy = np.array(exact) + np.array([0.01, -0.02, 0.015, 0.0, -0.01, 0.02, 0.005, -0.005])
    fit = inference.regression(arms, seeds, kl, noisy)
    x = np.array([[a == "a", a == "b", s == 1, k] for a, s, k in zip(arms, seeds, kl, strict=True)], float)
    coef = np.linalg.solve(x.T @ x, x.T @ noisy)  # the normal equations, by hand
    sigma2 = ((noisy - x @ coef) ** 2).sum() / (8 - 4)
    c = np.array([1.0, -1.0, 0.0, 0.0])
    value, se = fit.difference("a", "b")
    assert value == pytest.approx(coef[0] - coef[1]) and se == pytest.approx(np.sqrt(sigma2 * c @ np.linalg.inv(
        x.T @ x) @ c))


@pytest.mark.parametrize(("q", "dof", "table"), [(0.975, 1, 12.706205), (0.975, 2, 4.302653), (0.8, 2, 1.060660),
                                                 (0.975, 3, 3.182446), (0.8, 4, 0.940965), (0.975, 10, 2.228139),
                                                 (0.975, 30, 2.042272), (0.5, 7, 0.0)])
def test_student_t_quantiles_match_the_printed_table(q, dof, table):
    assert inference.student_t_quantile(q, dof) == pytest.approx(table, abs=2e-6)
    assert inference.student_t_cdf(inference.student_t_quantile(q, dof), dof) == pytest.approx(q, abs=1e-9)


def test_student_t_cdf_in_closed_form_by_hand_and_against_a_naive_integral():
    assert inference.student_t_cdf(1.0, 1) == pytest.approx(0.75)  # Cauchy: 1/2 + arctan(1)/π
    assert inference.student_t_cdf(2 * np.sqrt(3), 2) == pytest.approx(0.5 + np.sqrt(3) / np.sqrt(14))  # t/(2√(t²+2))
    assert inference.student_t_cdf(-0.7, 5) == pytest.approx(1 - inference.student_t_cdf(0.7, 5), abs=1e-15)
    from math import gamma, pi, sqrt
    for dof in (3, 4, 9):  # the density integrated by the trapezoid rule from 0
        x = np.linspace(0.0, 1.3, 200_001)
        density = gamma((dof + 1) / 2) / (sqrt(dof * pi) * gamma(dof / 2)) * (1 + x**2 / dof) ** (-(dof + 1) / 2)
        assert inference.student_t_cdf(1.3, dof) == pytest.approx(0.5 + np.trapezoid(density, x), abs=1e-10)


def test_paired_t_against_hand_numbers():
    # differences 1, 2, 3: mean 2, sd 1, SE 1/√3, t = 2√3 on 2 degrees of freedom
    t = inference.paired_t([1.0, 2.0, 3.0])
    se = 1 / np.sqrt(3)
    assert (t.mean, t.dof) == (2.0, 2) and t.se == pytest.approx(se)
    assert t.p == pytest.approx(2 * (0.5 - np.sqrt(3) / np.sqrt(14)))  # 0.074180
    assert t.interval == pytest.approx((2 - 4.302653 * se, 2 + 4.302653 * se), abs=1e-6)
    assert t.resolution == pytest.approx((4.302653 + 1.060660) * se, abs=1e-6)
    assert inference.paired_t([0.5, 0.5]).p == 0.0 and inference.paired_t([0.0, 0.0]).p == 1.0  # no spread
    with pytest.raises(ValueError, match="at least 2"):
        inference.paired_t([1.0])
