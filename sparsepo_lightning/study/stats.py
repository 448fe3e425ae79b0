"""Statistics of the study report: frontier areas, paired bootstrap over prompts, Spearman with permutations.

All functions are pure (NumPy in, numbers out) and seeded, so a report regenerated from the same logs is identical.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def pareto_front(kl: Sequence[float], reward: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The non-dominated points (no other point has lower-or-equal KL and higher reward), sorted by KL."""
    order = np.lexsort((-np.asarray(reward, float), np.asarray(kl, float)))
    xs, ys, best = [], [], -np.inf
    for i in order:
        if reward[i] > best:
            xs.append(float(kl[i]))
            ys.append(float(reward[i]))
            best = reward[i]
    return np.asarray(xs), np.asarray(ys)


def frontier_curve(kl: Sequence[float], reward: Sequence[float], anchor: tuple[float, float]) -> tuple[np.ndarray,
                                                                                                      np.ndarray]:
    """A method's reward–KL frontier: the Pareto front of its runs plus the reference ``anchor`` (KL 0).

    KL estimates of a run can be slightly negative (sampling noise); they are clipped at 0.
    """
    xs = np.concatenate([[anchor[0]], np.clip(np.asarray(kl, float), 0.0, None)])
    ys = np.concatenate([[anchor[1]], np.asarray(reward, float)])
    return pareto_front(xs, ys)


def mean_reward_over_kl(front_kl: np.ndarray, front_reward: np.ndarray, kl_max: float) -> float:
    """Mean of the frontier's reward over KL in ``[0, kl_max]``: its area divided by ``kl_max``.

    Between front points the reward is interpolated linearly (a mixture of two policies reaches any point on the
    segment); the front's first point is at KL 0 (the reference anchor).

    Raises:
        ValueError: ``kl_max`` is not positive or beyond the front's largest KL.
    """
    if not kl_max > 0:
        raise ValueError(f"kl_max={kl_max}: must be > 0")
    if kl_max > front_kl[-1] + 1e-12:
        raise ValueError(f"kl_max={kl_max} is beyond the frontier's largest KL {front_kl[-1]}")
    grid = np.linspace(0.0, kl_max, 513)
    return float(np.trapezoid(np.interp(grid, front_kl, front_reward), grid) / kl_max)


def frontier_scores(points: Mapping[str, tuple[np.ndarray, np.ndarray]], anchor: tuple[float, float],
                    kl_max: float | None = None) -> tuple[dict[str, float], float]:
    """Mean frontier reward of every method over the KL range common to all (``[0, min_m max KL_m]``).

    Args:
        points: method -> (KL, reward) of its runs.
        anchor: (0, reward of the reference).
        kl_max: the KL range; default the smallest of the methods' largest frontier KL.

    Returns:
        (method -> score, the KL range used).
    """
    fronts = {m: frontier_curve(kl, reward, anchor) for m, (kl, reward) in points.items()}
    if kl_max is None:
        kl_max = min(front[0][-1] for front in fronts.values())
    if not kl_max > 0:
        return {m: float("nan") for m in fronts}, float(kl_max)
    return {m: mean_reward_over_kl(*front, kl_max) for m, front in fronts.items()}, float(kl_max)


def bootstrap_frontier_scores(
    per_prompt: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]], anchor_per_prompt: np.ndarray,
    num_resamples: int = 1000, seed: int = 0,
) -> tuple[dict[str, float], dict[str, np.ndarray], float]:
    """Frontier scores and their bootstrap distribution over prompts (the same resampled prompts for every run).

    Args:
        per_prompt: method -> one ``(kl_per_prompt, reward_per_prompt)`` per run, arrays of the P held-out prompts.
        anchor_per_prompt: the reference's reward per prompt ``(P,)``.

    Returns:
        (point estimates, method -> ``(num_resamples,)`` resampled scores, the KL range of the point estimate;
        the same range is used in every resample so that the scores stay comparable).
    """
    def scores(index: np.ndarray, kl_max: float | None) -> tuple[dict[str, float], float]:
        points = {m: (np.array([kl[index].mean() for kl, _ in runs]), np.array([r[index].mean() for _, r in runs]))
                  for m, runs in per_prompt.items()}
        return frontier_scores(points, (0.0, float(anchor_per_prompt[index].mean())), kl_max)

    num_prompts = len(anchor_per_prompt)
    estimate, kl_max = scores(np.arange(num_prompts), None)
    rng = np.random.default_rng(seed)
    samples = {m: np.empty(num_resamples) for m in per_prompt}
    for b in range(num_resamples):
        index = rng.integers(0, num_prompts, num_prompts)
        resampled = _clipped_scores(scores, index, kl_max)
        for m in per_prompt:
            samples[m][b] = resampled[m]
    return estimate, samples, kl_max


def _clipped_scores(scores, index: np.ndarray, kl_max: float) -> dict[str, float]:  # noqa: ANN001
    """Scores of a resample at ``kl_max``, or at its own common range when a resampled front falls short of it."""
    try:
        return scores(index, kl_max)[0]
    except ValueError:
        return scores(index, None)[0]


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap samples (NaNs ignored)."""
    tail = (1 - level) / 2 * 100
    if np.isnan(samples).all():
        return float("nan"), float("nan")
    low, high = np.nanpercentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank), 0-based."""
    values = np.asarray(values, float)
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks_sorted = np.arange(len(values), dtype=float)
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            ranks_sorted[start:end] = (start + end - 1) / 2
            start = end
    out = np.empty(len(values))
    out[order] = ranks_sorted
    return out


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson on average ranks); NaN when either side is constant."""
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = np.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")


def spearman_permutation(x: np.ndarray, y: np.ndarray, num_permutations: int = 2000,
                         seed: int = 0) -> tuple[float, float]:
    """Spearman's ρ and its two-sided permutation p-value ``(1 + #{|ρ_perm| ≥ |ρ|}) / (1 + n_perm)``."""
    rho = spearman(x, y)
    if np.isnan(rho):
        return rho, float("nan")
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    norm = np.sqrt((rx**2).sum() * (ry**2).sum())
    rng = np.random.default_rng(seed)
    exceed = sum(abs(float((rx[rng.permutation(len(rx))] * ry).sum() / norm)) >= abs(rho) - 1e-12
                 for _ in range(num_permutations))
    return rho, (1 + exceed) / (1 + num_permutations)
