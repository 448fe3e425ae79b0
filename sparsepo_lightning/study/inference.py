"""Statistics of a plan's comparisons: a hierarchical bootstrap (seeds, then prompts within each seed), frontier
scores over a KL range fixed before resampling, Holm's correction, a run-level regression, Student's paired t over
seeds and the design's resolution.

Why hierarchical: changing the seed (data order, mask draws) moves a run's reward and KL by more than the differences
a study tests, so an interval that resamples prompts only is too narrow. Each resample draws ``S`` seeds with
replacement from the ``S`` seeds run, then for each drawn seed ``P`` prompts with replacement (the same drawn seed and
prompts for every arm: the comparison is paired by seed and prompt). An arm's score is the mean over the drawn seeds
of that seed's frontier score (its runs at every β and evaluated step, anchored at the reference's reward at KL 0).

All functions are NumPy in, numbers out, and seeded: the same logs give the same report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from sparsepo_lightning.study.stats import frontier_curve

GRID = 513
"""Points of the KL grid a frontier's mean reward is integrated on (trapezoid rule)."""

SeedPoints = tuple[np.ndarray, np.ndarray]
"""One seed's evaluations of an arm: per-prompt KL and reward, each ``(J, P)`` (J = runs × evaluated steps)."""


def frontier_score(kl: np.ndarray, reward: np.ndarray, anchor: float, kl_max: float) -> tuple[float, float]:
    """Mean reward of the Pareto frontier of ``(kl, reward)`` points (anchored at ``(0, anchor)``) over
    ``[0, kl_max]``, and the share of that range past the frontier's last point.

    Past its last point the frontier is extended flat (its last reward): a frontier that falls short of ``kl_max``
    is scored over the same range as the others, never over a shorter one.
    """
    front_kl, front_reward = frontier_curve(kl, reward, (0.0, anchor))
    grid = np.linspace(0.0, kl_max, GRID)
    score = float(np.trapezoid(np.interp(grid, front_kl, front_reward), grid) / kl_max)
    return score, max(0.0, kl_max - float(front_kl[-1])) / kl_max


def front_reach(points: Sequence[SeedPoints], anchor: float) -> float:
    """The smallest, over seeds, of the largest KL a seed's frontier reaches (all prompts)."""
    return min(float(frontier_curve(kl.mean(-1), reward.mean(-1), (0.0, anchor))[0][-1]) for kl, reward in points)


def first_point_share(points: Sequence[SeedPoints], anchor: float, kl_max: float) -> np.ndarray:
    """Per seed, the share of ``[0, kl_max]`` that lies before its frontier's first evaluated point (all prompts):
    there the frontier is the straight line from the reference to that point, not a measured policy."""
    shares = []
    for kl, reward in points:
        front_kl = frontier_curve(kl.mean(-1), reward.mean(-1), (0.0, anchor))[0]
        shares.append(min(1.0, float(front_kl[1]) / kl_max) if len(front_kl) > 1 else 1.0)
    return np.array(shares)


@dataclass(frozen=True)
class Bootstrap:
    """Point estimates and resamples of the arms' scores over one fixed KL range.

    Attributes:
        estimate: arm -> mean over seeds of the seed's frontier score (all seeds, all prompts).
        per_seed: arm -> ``(S,)`` each seed's frontier score (all prompts), the seeds in the order given.
        samples: arm -> ``(B,)`` resampled scores.
        kl_max: the KL range ``[0, kl_max]``, fixed before resampling.
        extended: share of the resampled seed fronts that fell short of ``kl_max`` (extended flat).
        extended_range: mean share of the range covered by the flat extension, over those that fell short.
    """

    estimate: dict[str, float]
    per_seed: dict[str, np.ndarray]
    samples: dict[str, np.ndarray]
    kl_max: float
    extended: float
    extended_range: float


def hierarchical_bootstrap(points: Mapping[str, Sequence[SeedPoints]], anchor: np.ndarray, kl_max: float,
                           num_resamples: int = 1000, seed: int = 0, prompts: str = "nested") -> Bootstrap:
    """Frontier scores of every arm and their two-level bootstrap over seeds and prompts.

    Args:
        points: arm -> one ``SeedPoints`` per seed, the seeds in the same order for every arm.
        anchor: the reference's reward per prompt ``(P,)``.
        kl_max: the KL range (see ``front_reach``), the same for the estimate and every resample.
        prompts: ``"nested"``: each drawn seed gets its own prompt draw (prompts within seeds); ``"crossed"``: one
            prompt draw per resample, shared by all its drawn seeds (seeds and prompts resampled independently, Owen's
            "pigeonhole" bootstrap for a crossed design: every seed is evaluated on the same prompts, so a prompt's
            effect is common to all seeds and is not averaged away over them).

    Draws, in this order: ``seeds = rng.integers(0, S, (B, S))``, then ``prompts = rng.integers(0, P, (B, S, P))``
    (nested) or ``rng.integers(0, P, (B, 1, P))`` repeated over the S seeds (crossed). Every arm uses the same draws.
    """
    if prompts not in ("nested", "crossed"):
        raise ValueError(f"prompts={prompts!r}: expected 'nested' or 'crossed'")
    num_seeds, num_prompts = len(next(iter(points.values()))), len(anchor)
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(0, num_seeds, (num_resamples, num_seeds))
    prompt_draws = rng.integers(0, num_prompts, (num_resamples, num_seeds if prompts == "nested" else 1, num_prompts))
    prompt_draws = np.broadcast_to(prompt_draws, (num_resamples, num_seeds, num_prompts))
    anchor_means = anchor[prompt_draws].mean(-1)  # (B, S)
    estimate, seed_scores, samples, extended = {}, {}, {}, []
    for arm, per_seed in points.items():
        if len(per_seed) != num_seeds:
            raise ValueError(f"arm {arm}: {len(per_seed)} seeds, the others {num_seeds}")
        seed_scores[arm] = np.array([frontier_score(kl.mean(-1), r.mean(-1), float(anchor.mean()), kl_max)[0]
                                     for kl, r in per_seed])
        estimate[arm] = float(seed_scores[arm].mean())
        scores = np.empty((num_resamples, num_seeds))
        for s, (kl, reward) in enumerate(per_seed):
            drawn = seed_draws == s  # (B, S): the draws that picked seed s
            index = prompt_draws[drawn]  # (n, P)
            kl_means, reward_means = kl[:, index].mean(-1).T, reward[:, index].mean(-1).T  # (n, J)
            results = [frontier_score(k, r, a, kl_max) for k, r, a in zip(kl_means, reward_means,
                                                                          anchor_means[drawn], strict=True)]
            scores[drawn] = [score for score, _ in results]
            extended += [short for _, short in results]
        samples[arm] = scores.mean(1)
    short = np.array(extended)
    return Bootstrap(estimate, seed_scores, samples, kl_max, float((short > 0).mean()),
                     float(short[short > 0].mean()) if (short > 0).any() else 0.0)


def bootstrap_p(differences: np.ndarray) -> float:
    """Two-sided bootstrap p-value of a difference being 0: ``min(1, 2 min(1 + #{d ≤ 0}, 1 + #{d ≥ 0}) / (B + 1))``
    (consistent with the percentile interval; its floor is ``2 / (B + 1)``)."""
    below, above = int((differences <= 0).sum()), int((differences >= 0).sum())
    return min(1.0, 2 * (1 + min(below, above)) / (len(differences) + 1))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values: sorted ascending, ``p̃_(i) = max_{j ≤ i} min(1, (m − j + 1) p_(j))``."""
    order = np.argsort(p_values, kind="stable")
    adjusted, running = np.empty(len(p_values)), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted.tolist()


def format_p(p: float, floor: float) -> str:
    """A p-value as text; at the floor of a resampling test (``1/(N+1)`` for N permutations) it reads ``≤ floor``."""
    if np.isnan(p):
        return "–"
    return f"≤ {floor:.2g}" if p <= floor * (1 + 1e-9) else f"{p:.3f}"


def resolution(se: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true difference detected with probability ``power`` by a two-sided test at level ``alpha``
    whose estimate has standard error ``se``: ``(z_{1−α/2} + z_{power}) · se`` (= 2.80 se at α 0.05, 80 %)."""
    normal = NormalDist()
    return (normal.inv_cdf(1 - alpha / 2) + normal.inv_cdf(power)) * se


def student_t_cdf(t: float, dof: int) -> float:
    """P(T ≤ t) for Student's t with an integer number of degrees of freedom, in closed form (Abramowitz and Stegun
    26.7.3–4: a finite series in θ = arctan(t / √dof))."""
    theta = float(np.arctan(t / np.sqrt(dof)))
    sin, cos2 = np.sin(theta), np.cos(theta) ** 2
    if dof % 2:  # odd: 2/π (θ + sin θ cos θ (1 + 2/3 cos²θ + (2·4)/(3·5) cos⁴θ + ...)), the series up to cos^(dof−3)
        term, series = 1.0, 1.0 if dof > 1 else 0.0
        for k in range(1, (dof - 1) // 2):
            term *= 2 * k / (2 * k + 1) * cos2
            series += term
        central = 2 / np.pi * (theta + sin * np.sqrt(cos2) * series)
    else:  # even: sin θ (1 + 1/2 cos²θ + (1·3)/(2·4) cos⁴θ + ...), up to cos^(dof−2)
        term, series = 1.0, 1.0
        for k in range(1, dof // 2):
            term *= (2 * k - 1) / (2 * k) * cos2
            series += term
        central = sin * series
    return float(0.5 + 0.5 * central)  # central = P(|T| ≤ t), signed with t


def student_t_quantile(q: float, dof: int) -> float:
    """The ``q`` quantile of Student's t with ``dof`` degrees of freedom (bisection on ``student_t_cdf``)."""
    low, high = -1e6, 1e6
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if student_t_cdf(middle, dof) < q else (low, middle)
    return (low + high) / 2


@dataclass(frozen=True)
class PairedT:
    """Student's paired t over seeds: one difference per seed, the seeds as the independent units.

    Attributes:
        mean, se: the mean difference and its standard error ``sd / √S`` (``sd`` with ``ddof = 1``).
        dof: ``S − 1``.
        interval: the 95 % interval ``mean ± t_{0.975, dof} · se``.
        p: two-sided p-value of a zero mean difference.
        resolution: ``(t_{0.975, dof} + t_{0.8, dof}) · se``, the usual approximation of the smallest true
            difference found with 80 % power at α = 0.05.
    """

    mean: float
    se: float
    dof: int
    interval: tuple[float, float]
    p: float
    resolution: float


def paired_t(differences: Sequence[float]) -> PairedT:
    """Student's paired t-test of per-seed differences (at least two)."""
    d = np.asarray(differences, float)
    if len(d) < 2:
        raise ValueError(f"a paired t-test needs at least 2 differences, got {len(d)}")
    dof, mean, se = len(d) - 1, float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))
    critical = student_t_quantile(0.975, dof)
    p = 2 * (1 - student_t_cdf(abs(mean) / se, dof)) if se > 0 else float(mean == 0)
    return PairedT(mean, se, dof, (mean - critical * se, mean + critical * se), min(1.0, p),
                   (critical + student_t_quantile(0.8, dof)) * se)


@dataclass(frozen=True)
class Regression:
    """Least squares ``reward_r = α_arm(r) + γ_seed(r) + δ · KL_r + ε_r`` over runs (final evaluations).

    Attributes:
        arms: arm -> α (the arm's reward at equal KL and seed).
        slope: δ, reward per nat of KL (shared by all arms).
        cov: covariance of (α..., γ..., δ): ``σ̂² (XᵀX)⁻¹`` with ``σ̂² = RSS / (n − rank)``.
        names: the coefficient names, in ``cov``'s order.
        dof: residual degrees of freedom.
    """

    arms: dict[str, float]
    slope: float
    cov: np.ndarray
    names: list[str]
    dof: int

    def difference(self, a: str, b: str) -> tuple[float, float]:
        """``α_a − α_b`` and its standard error."""
        contrast = np.zeros(len(self.names))
        contrast[self.names.index(a)], contrast[self.names.index(b)] = 1.0, -1.0
        return self.arms[a] - self.arms[b], float(np.sqrt(max(contrast @ self.cov @ contrast, 0.0)))


def regression(arms: Sequence[str], seeds: Sequence[int], kl: Sequence[float], reward: Sequence[float]) -> Regression:
    """Fit ``Regression`` (NumPy least squares) to one row per run: its arm, seed, KL and reward.

    The design has one indicator column per arm (no intercept), one per seed but the first, and KL.
    """
    arm_names, seed_values = list(dict.fromkeys(arms)), sorted(set(seeds))
    x = np.zeros((len(arms), len(arm_names) + len(seed_values)))
    x[np.arange(len(arms)), [arm_names.index(a) for a in arms]] = 1.0
    for column, s in enumerate(seed_values[1:], start=len(arm_names)):
        x[np.asarray(seeds) == s, column] = 1.0
    x[:, -1] = kl
    y = np.asarray(reward, float)
    coef, _, rank, _ = np.linalg.lstsq(x, y, rcond=None)
    dof = max(len(y) - int(rank), 1)
    sigma2 = float(((y - x @ coef) ** 2).sum() / dof)
    names = arm_names + [f"seed {s}" for s in seed_values[1:]] + ["KL"]
    return Regression(dict(zip(arm_names, coef[: len(arm_names)].tolist(), strict=True)), float(coef[-1]),
                      sigma2 * np.linalg.pinv(x.T @ x), names, dof)
