"""The report sections of a plan with ``statistics: hierarchical``: a verdict per listed comparison (hierarchical
bootstrap over a fixed KL range, Holm across the comparisons, the design's resolution), the run-level regression,
Student's paired t over seeds, the crossed (seeds × prompts) bootstrap as a check on the intervals' width and the mask
diagnostics per arm. Every number comes from the per-run logs (``logs.RunLog``)."""

from __future__ import annotations

from collections import defaultdict
from statistics import NormalDist
from typing import Any

import numpy as np

from sparsepo_lightning.study import inference, stats
from sparsepo_lightning.study.logs import RunLog, by_method
from sparsepo_lightning.study.planfile import Comparison, StudyPlan

ALPHA = 0.05


def seed_points(runs: list[RunLog], reward_key: str) -> dict[str, dict[int, inference.SeedPoints]]:
    """arm -> seed -> per-prompt (KL, reward) of every evaluation (runs × evaluated steps) of that seed."""
    points: dict[str, dict[int, inference.SeedPoints]] = {}
    for arm, group in by_method([r for r in runs if r.evals]).items():
        by_seed: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for r in group:
            by_seed[r.seed] += list(r.evals.values())
        points[arm] = {s: (np.array([e["kl_per_prompt"] for e in evals]), np.array([e[reward_key] for e in evals]))
                       for s, evals in sorted(by_seed.items())}
    return points


def _common(points: dict[str, dict[int, inference.SeedPoints]], arms: list[str]) -> dict[str, list]:
    seeds = sorted(set.intersection(*(set(points[a]) for a in arms)))
    return {a: [points[a][s] for s in seeds] for a in arms}


def compare(study: StudyPlan, runs: list[RunLog], reference: dict[str, Any],
            reward_key: str = "reward_per_prompt") -> dict[str, Any]:
    """Every listed comparison whose two arms have a common evaluated seed: estimate, interval, p-values, resolution."""
    points, anchor = seed_points(runs, reward_key), np.array(reference[reward_key])
    base = float(anchor.mean())
    results: dict[Comparison, dict[str, Any]] = {}
    for comparison in study.comparisons:
        pair = [comparison.a, comparison.b]
        if not all(a in points for a in pair) or not _common(points, pair)[comparison.a]:
            continue
        data = _common(points, pair)
        kl_max = comparison.kl_max or min(inference.front_reach(data[a], base) for a in pair)
        if not kl_max > 0:  # a seed's runs are all dominated by the reference: there is no range to score
            results[comparison] = {"unscored": True, "seeds": len(data[comparison.a])}
            continue
        boot = inference.hierarchical_bootstrap(data, anchor, kl_max, study.bootstrap, seed=0)
        diff = boot.samples[comparison.a] - boot.samples[comparison.b]
        se = float(diff.std(ddof=1))
        results[comparison] = {"estimate": boot.estimate[comparison.a] - boot.estimate[comparison.b],
                               "interval": stats.interval(diff), "p": inference.bootstrap_p(diff), "se": se,
                               "resolution": inference.resolution(se), "kl_max": kl_max,
                               "seeds": len(data[comparison.a]), "extended": boot.extended,
                               "extended_range": boot.extended_range,
                               "before_first": np.concatenate([inference.first_point_share(data[a], base, kl_max)
                                                               for a in pair]),
                               "seed_differences": boot.per_seed[comparison.a] - boot.per_seed[comparison.b]}
        crossed = inference.hierarchical_bootstrap(data, anchor, kl_max, study.bootstrap, seed=0, prompts="crossed")
        shared = crossed.samples[comparison.a] - crossed.samples[comparison.b]
        results[comparison]["crossed"] = {"se": float(shared.std(ddof=1)), "p": inference.bootstrap_p(shared),
                                          "interval": stats.interval(shared)}
    scored = [c for c, r in results.items() if "unscored" not in r]
    for comparison, p in zip(scored, inference.holm([results[c]["p"] for c in scored]), strict=True):
        results[comparison]["holm"] = p
    return {"comparisons": results, "floor": 2 / (study.bootstrap + 1)}


def arm_table(study: StudyPlan, runs: list[RunLog], reference: dict[str, Any]) -> list[str]:
    """Every arm's frontier score over one KL range all of them reach, on the seeds all of them ran (hierarchical
    bootstrap intervals); the comparisons below each use their own range."""
    points, anchor = seed_points(runs, "reward_per_prompt"), np.array(reference["reward_per_prompt"])
    if not points:
        return []
    data = _common(points, list(points))
    if not data[next(iter(data))]:
        return []
    kl_max = min(inference.front_reach(p, float(anchor.mean())) for p in data.values())
    if not kl_max > 0:
        return []
    boot = inference.hierarchical_bootstrap(data, anchor, kl_max, study.bootstrap, seed=0)
    n = len(data[next(iter(data))])
    seeds = "the 1 seed all arms ran" if n == 1 else f"each of the {n} seeds all arms ran"
    lines = [f"Frontier score of every arm over KL ∈ [0, {kl_max:.3f}] (the range every arm's front reaches in "
             f"{seeds}), 95 % hierarchical bootstrap intervals:", "",
             "| arm | evaluations | frontier score | 95 % interval |", "|---|---|---|---|"]
    for arm, per_seed in data.items():
        low, high = stats.interval(boot.samples[arm])
        count = sum(kl.shape[0] for kl, _ in per_seed)
        lines.append(f"| {study.arms[arm].label} | {count} | {boot.estimate[arm]:.4f} | [{low:.4f}, {high:.4f}] |")
    return lines


def _verdict(r: dict[str, Any]) -> str:
    """``higher`` or ``lower`` (arm a against arm b) where the Holm-adjusted p is at most α, else ``none``."""
    if r["holm"] > ALPHA:
        return "none"
    return "higher" if r["estimate"] > 0 else "lower"


def _answer(study: StudyPlan, c: Comparison, r: dict[str, Any]) -> str:
    a, b = study.arms[c.a].label, study.arms[c.b].label
    if r["holm"] <= ALPHA:
        side = "higher" if r["estimate"] > 0 else "lower"
        return f"yes: {a} scores {side} than {b}"
    return (f"no measurable difference between {a} and {b}; this design detects a true difference of "
            f"{r['resolution']:.4f} or more with 80 % power")


def _pair(study: StudyPlan, c: Comparison) -> str:
    """A comparison as the report names it: ``<label of a> − <label of b>``."""
    return f"{study.arms[c.a].label} − {study.arms[c.b].label}"


def _upper(text: str) -> str:
    return text[:1].upper() + text[1:]


def _holm_text(result: dict[str, Any], floor: float) -> str:
    """The Holm-adjusted p-value; an upper bound (``≤``) when the raw p-value is the resampling floor."""
    at_floor = result["p"] <= floor * (1 + 1e-9)
    return f"≤ {result['holm']:.2g}" if at_floor else f"{result['holm']:.3f}"


def verdict_lines(study: StudyPlan, section: dict[str, Any]) -> list[str]:
    """One line per comparison: the question, the answer in words, and its numbers."""
    lines = []
    for c, r in section["comparisons"].items():
        if "unscored" in r:
            lines.append(f"- **{c.question}** Not scored yet: in at least one seed no evaluation of "
                         f"{study.arms[c.a].label} or {study.arms[c.b].label} beats the reference's reward, so their "
                         "common KL range is empty.")
            continue
        low, high = r["interval"]
        lines.append(f"- **{c.question}** {_upper(_answer(study, c, r))} ({r['estimate']:+.4f} reward over "
                     f"KL ≤ {r['kl_max']:.3f}, 95 % interval [{low:+.4f}, {high:+.4f}], Holm-adjusted p "
                     f"{_holm_text(r, section['floor'])}, "
                     + ("1 seed, so the interval holds no seed-to-seed variance" if r["seeds"] == 1
                        else f"{r['seeds']} seeds") + ").")
    return lines + _interpolated_line(study, section)


def _interpolated_line(study: StudyPlan, section: dict[str, Any]) -> list[str]:
    """A caution for the comparisons whose KL range lies mostly before the fronts' first evaluated run."""
    shares = {c: float(r["before_first"].mean()) for c, r in section["comparisons"].items()
              if "before_first" in r and r["before_first"].mean() > 0.5}
    if not shares:
        return []
    names = "; ".join(f"{_pair(study, c)}: {100 * v:.0f} %" for c, v in shares.items())
    return [f"- Read with care: in {len(shares)} of the {len(section['comparisons'])} comparisons, more than half of "
            f"the KL range lies, on average over the seeds, before the fronts' first evaluated run ({names}). There a "
            "front is the straight line from the reference to that run, so these scores mostly compare the reward "
            "per nat of the lowest-KL runs, not policies measured at low KL; runs at a larger β, or evaluated earlier "
            "in training, would measure that part of the range (column \"before the first run\" below)."]


def summary_sentence(study: StudyPlan, section: dict[str, Any]) -> str:
    """The conclusion in one sentence (the README quotes it): the comparisons with a measurable difference after the
    Holm correction, then how many show none and the smallest difference the design could have detected for them."""
    scored = {c: r for c, r in section["comparisons"].items() if "unscored" not in r}
    if not scored:
        return "No listed comparison can be scored yet."
    found = [f"{study.arms[c.a].label} scores {_verdict(r)} than {study.arms[c.b].label} ({r['estimate']:+.4f} reward "
             "at equal KL)" for c, r in scored.items() if _verdict(r) != "none"]
    none = [r["resolution"] for r in scored.values() if _verdict(r) == "none"]
    detectable = (f"{min(none):.4f}" if min(none) == max(none) else f"{min(none):.4f} to {max(none):.4f}") if none \
        else ""
    listed, noun = len(study.comparisons), "comparison" if len(scored) == 1 else "comparisons"
    named = (f"the {len(scored)} listed {noun}" if len(scored) == listed
             else f"the {len(scored)} {noun} scored so far (of the {listed} listed)")
    if not found:
        subject = _upper(named) if len(scored) == 1 else f"None of {named}"
        return (f"{subject} shows {'no' if len(scored) == 1 else 'a'} measurable difference in reward at equal KL; "
                f"the design detects true differences of {detectable} or more with 80 % power.")
    rest = (f"; the other {len(none)} of {named} {'shows' if len(none) == 1 else 'show'} no "
            f"measurable difference (detectable: {detectable} or more with 80 % power)") if none else ""
    return f"{'; '.join(found)}{rest}."


def _holm_family(scored: int, listed: int) -> str:
    """Which comparisons the Holm correction spans: all those listed before the runs, or, in a partial study, the
    ones scored so far (the complete study corrects across all of them)."""
    if scored == listed:
        return f"{listed} comparisons listed in the plan before the runs"
    return (f"{scored} comparison{'' if scored == 1 else 's'} scored so far (the plan lists {listed} before the runs; "
            f"the complete study corrects across all {listed})")


def comparison_table(study: StudyPlan, section: dict[str, Any]) -> list[str]:
    if not section["comparisons"]:
        return [f"None of the {len(study.comparisons)} listed comparisons has both its arms evaluated on a common seed "
                "yet."]
    m = sum("unscored" not in r for r in section["comparisons"].values())
    strict = NormalDist().inv_cdf(1 - ALPHA / (2 * max(m, 1))) + NormalDist().inv_cdf(0.8)
    lines = [f"Each comparison: frontier score of the first arm minus the second's. A seed's frontier is the Pareto "
             "front of its runs at every β and evaluated step, anchored at the reference (KL 0) and linear between "
             "points; its score is its mean reward over the comparison's KL range, fixed once from all the data "
             "(the largest KL every seed's front of both arms reaches) before resampling. 95 % percentile intervals "
             f"from {study.bootstrap:,} hierarchical bootstrap resamples (seeds with replacement, then prompts within "
             "each drawn seed; paired across arms); a resampled front that falls short of the range is extended flat "
             "from its last point (share below). Before a front's first evaluated point the front is the straight "
             "line from the reference to it: the column \"before the first run\" gives the share of the range that "
             "line covers, mean (largest) over the two arms' seeds. p: two-sided bootstrap p-value (floor 2/(B+1)); "
             f"Holm: adjusted across the {_holm_family(m, len(study.comparisons))}. Resolution = (z₀.₉₇₅ + z₀.₈) × SE "
             f"= 2.80 × SE, the smallest true difference found with 80 % power at α = 0.05 (at Holm's strictest step, "
             f"α/{m}: {strict:.2f} × SE).", "",
             "| comparison | seeds | KL range | estimate | 95 % interval | p | Holm p | SE | resolution | fronts "
             "extended | before the first run |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c, r in section["comparisons"].items():
        if "unscored" in r:
            lines.append(f"| {_pair(study, c)} | {r['seeds']} | empty |" + " – |" * 8)
            continue
        low, high = r["interval"]
        lines.append(f"| {_pair(study, c)} | {r['seeds']} | [0, {r['kl_max']:.3f}] | "
                     f"{r['estimate']:+.4f} | [{low:+.4f}, {high:+.4f}] | "
                     f"{inference.format_p(r['p'], section['floor'])} | "
                     f"{_holm_text(r, section['floor'])} | {r['se']:.4f} | {r['resolution']:.4f} | "
                     f"{100 * r['extended']:.0f} % (by {100 * r['extended_range']:.0f} % of the range) | "
                     f"{100 * r['before_first'].mean():.0f} % ({100 * r['before_first'].max():.0f} %) |")
    return lines


def second_scorer_lines(study: StudyPlan, first: dict[str, Any], second: dict[str, Any], scorer: str) -> list[str]:
    lines = []
    for c, r in first["comparisons"].items():
        if c not in second["comparisons"] or "unscored" in r or "unscored" in second["comparisons"][c]:
            continue
        r2 = second["comparisons"][c]
        same = _verdict(r) == _verdict(r2)
        lines.append(f"- Under {scorer}, {_pair(study, c)} "
                     f"{'keeps its verdict' if same else 'changes verdict'}: {r2['estimate']:+.4f}, Holm-adjusted "
                     f"p {_holm_text(r2, second['floor'])}.")
    return lines


def regression_lines(study: StudyPlan, runs: list[RunLog]) -> list[str]:
    """The second view: run-level least squares of reward on KL with arm and seed terms."""
    done = [r for r in runs if r.eval]
    if len({r.method for r in done}) < 2 or len(done) <= len({r.method for r in done}) + len({r.seed for r in done}):
        return []
    fit = inference.regression([r.method for r in done], [r.seed for r in done],
                               [max(r.eval["kl_mean"], 0.0) for r in done], [r.eval["reward_mean"] for r in done])
    lines = [f"Ordinary least squares over the {len(done)} runs' final evaluations: reward = α_arm + γ_seed + δ·KL "
             f"(one KL slope for all arms, δ = {fit.slope:+.4f} per nat; seed fixed effects; {fit.dof} residual "
             "degrees of freedom). α_a − α_b is the difference in reward at equal KL and seed; intervals are ±1.96 "
             "standard errors (normal approximation). It assumes reward is linear in KL over the runs' range, which "
             "the frontier score does not.", "", "| comparison | α difference | ± SE | 95 % interval |",
             "|---|---|---|---|"]
    for c in study.comparisons:
        if c.a in fit.arms and c.b in fit.arms:
            value, se = fit.difference(c.a, c.b)
            lines.append(f"| {_pair(study, c)} | {value:+.4f} | {se:.4f} | "
                         f"[{value - 1.96 * se:+.4f}, {value + 1.96 * se:+.4f}] |")
    return lines


def seed_level_lines(study: StudyPlan, section: dict[str, Any]) -> list[str]:
    """The third view: Student's paired t over seeds of each comparison's per-seed frontier-score differences,
    Holm-adjusted across the comparisons it covers (those scored on at least two seeds)."""
    tested = {c: inference.paired_t(r["seed_differences"]) for c, r in section["comparisons"].items()
              if "unscored" not in r and r["seeds"] >= 2}
    if not tested:
        return []
    rows = []
    for (c, t), adjusted in zip(tested.items(), inference.holm([t.p for t in tested.values()]), strict=True):
        low, high = t.interval
        differences = ", ".join(f"{d:+.4f}" for d in section["comparisons"][c]["seed_differences"])
        rows.append(f"| {_pair(study, c)} | {t.dof + 1} | {differences} | "
                    f"{t.mean:+.4f} | {t.se:.4f} | [{low:+.4f}, {high:+.4f}] | {t.p:.3f} | {adjusted:.3f} | "
                    f"{t.resolution:.4f} |")
    return ["Each seed's frontier-score difference (over the comparison's KL range above, all prompts) and Student's "
            "paired t-test with the seeds as the units (S − 1 degrees of freedom, normal differences assumed), "
            f"Holm-adjusted across the {len(rows)} comparison{'' if len(rows) == 1 else 's'} of this table. It treats "
            "the held-out prompts, the same for every seed, as fixed: its interval holds the seed-to-seed variance "
            "only, where the bootstrap's also holds the prompts' sampling variance, so it can be the narrower one. It "
            "does not share the bootstrap's small-sample bias (a bootstrap over S seeds underestimates the seed-level "
            "variance by the factor (S − 1)/S) but has S − 1 degrees of freedom. Its mean is the estimate above; "
            "resolution: (t₀.₉₇₅ + t₀.₈) × SE. This view was added to the report after the plan was fixed, as a "
            "check; the verdicts come from the plan's statistics.", "",
            "| comparison | seeds | per-seed differences | mean | SE | 95 % t interval | t-test p | Holm p | "
            "resolution |", "|---|---|---|---|---|---|---|---|---|", *rows]


def crossed_lines(study: StudyPlan, section: dict[str, Any]) -> list[str]:
    """The fourth view: each comparison's bootstrap redrawn with one prompt draw shared by all the drawn seeds of a
    resample (``inference.hierarchical_bootstrap(..., prompts="crossed")``) beside the plan's nested one, Holm-adjusted
    across the comparisons it covers."""
    crossed = {c: r for c, r in section["comparisons"].items() if "crossed" in r}
    if not crossed:
        return []
    rows = []
    adjusted = inference.holm([r["crossed"]["p"] for r in crossed.values()])
    for (c, r), holm_p in zip(crossed.items(), adjusted, strict=True):
        low, high = r["crossed"]["interval"]
        se = r["crossed"]["se"]
        ratio = f"{se / r['se']:.2f}" if r["se"] > 0 else "–"
        rows.append(f"| {_pair(study, c)} | {r['seeds']} | {r['estimate']:+.4f} | "
                    f"{r['se']:.4f} | {se:.4f} | {ratio} | [{low:+.4f}, {high:+.4f}] | "
                    f"{inference.format_p(r['crossed']['p'], section['floor'])} | "
                    f"{_holm_text({'p': r['crossed']['p'], 'holm': holm_p}, section['floor'])} | "
                    f"{inference.resolution(se):.4f} |")
    return ["Every seed is evaluated on the same held-out prompts, so a prompt's effect on a difference is shared by "
            "all seeds: the design is crossed (seeds × prompts), not nested. The plan's bootstrap draws the prompts "
            "anew within each drawn seed, which averages a shared prompt effect over the seeds and can make its "
            "interval too narrow. Here each comparison is bootstrapped again with the same seed draws and one prompt "
            "draw per resample shared by all its seeds (the pigeonhole bootstrap: Owen 2007, Ann. Appl. Stat. 1(2) "
            "386–411; mildly conservative, Owen & Eckles 2012, Ann. Appl. Stat. 6(3) 895–927), Holm-adjusted across "
            f"the {len(rows)} comparison{'' if len(rows) == 1 else 's'} of this table. A ratio of SEs near 1 says the "
            "plan's intervals are not too narrow; a ratio well above 1 says read them, and their resolution, as too "
            "narrow by that factor. This view was added to the report after the plan was fixed, as a check; the "
            "verdicts come from the plan's statistics.", "",
            "| comparison | seeds | estimate | SE (nested, the plan's) | SE (crossed) | crossed / nested | "
            "95 % crossed interval | crossed p | Holm p | resolution (crossed) |",
            "|---|---|---|---|---|---|---|---|---|---|", *rows]


def dump_diagnostics(dump: dict[str, Any], mask: str = "reward") -> dict[str, float]:
    """``masks.diagnostics.mask_diagnostics`` of one run's mask dump (chosen and rejected responses of the held-out
    pairs, padded into one ``(R, T)`` batch)."""
    import torch

    from sparsepo_lightning.masks.diagnostics import mask_diagnostics

    rows = [p[side][mask] for p in dump["pairs"] for side in ("chosen", "rejected") if p[side][mask]]
    length = max(len(r) for r in rows)
    weights = torch.zeros(len(rows), length)
    response_mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, row in enumerate(rows):  # building the batch from JSON lists; the statistics below are vectorised
        weights[i, : len(row)] = torch.tensor(row)
        response_mask[i, : len(row)] = True
    return {k: float(v) for k, v in mask_diagnostics(weights, response_mask).items()}


DIAGNOSTICS = ("zeros_share", "mean", "mean_kept", "gini", "effective_token_ratio", "within_cv",
               "between_variance_share")


def diagnostics_lines(study: StudyPlan, runs: list[RunLog]) -> list[str]:
    """Reward-mask diagnostics per arm from the runs' final mask dumps (held-out pairs), averaged over its runs."""
    rows = []
    for arm, group in by_method([r for r in runs if r.masks and r.masks.get("pairs")]).items():
        values = np.array([[dump_diagnostics(r.masks)[k] for k in DIAGNOSTICS] for r in group])
        cells = " | ".join(f"{v:.3f}" if abs(v) >= 5e-4 else "0.000" for v in values.mean(0))  # no "-0.000"
        rows.append(f"| {study.arms[arm].label} | {len(group)} | {cells} |")
    if not rows:
        return []
    return ["Reward mask of the held-out pairs at the end of training (`masks.json`), by "
            "`sparsepo_lightning.masks.diagnostics.mask_diagnostics`, averaged over the arm's runs: share of exact "
            "zeros, mean weight, mean kept weight, Gini (0: every token of a response weighted alike), effective-token "
            "ratio (Σw)²/(n Σw²) (1: uniform; k/n: k tokens share the weight), within-response coefficient of "
            "variation, and the share of the weight variance that lies between responses.", "",
            "| arm | runs | zeros | mean | mean kept | Gini | effective-token ratio | within CV | between share |",
            "|---|---|---|---|---|---|---|---|---|", *rows]
