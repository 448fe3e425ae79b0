"""A study's per-run logs as the report reads them: ``runs/*/{config,metrics,eval,eval_step<N>,masks}.json``."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsepo_lightning.study.planfile import StudyPlan


@dataclass
class RunLog:
    """The logs of one run directory; ``eval`` is the final checkpoint's evaluation, ``evals`` every evaluation by
    step (the final one included)."""

    name: str
    method: str
    beta: float
    seed: int
    metrics: dict[str, Any]
    eval: dict[str, Any] | None
    masks: dict[str, Any] | None
    config: dict[str, Any]
    evals: dict[int, dict[str, Any]] = field(default_factory=dict)


def read_json(path: Path) -> Any:
    """A JSON file's content, or None when it does not exist."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def load_runs(out: Path, study: StudyPlan) -> tuple[list[RunLog], dict[str, Any] | None]:
    """Every finished run of the plan's arms under ``out/runs`` (metrics and config present), in plan order, and the
    reference evaluation."""
    runs, reference = [], None
    for run_dir in sorted((out / "runs").glob("*")):
        if run_dir.name.startswith("reference-"):
            reference = read_json(run_dir / "eval.json") or reference
            continue
        metrics, config = read_json(run_dir / "metrics.json"), read_json(run_dir / "config.json")
        if metrics is None or config is None or metrics["method"] not in study.arms:
            continue
        final = read_json(run_dir / "eval.json")
        evals = {int(p.stem.removeprefix("eval_step")): read_json(p) for p in run_dir.glob("eval_step*.json")}
        if final is not None:
            evals[metrics["steps"]] = final
        runs.append(RunLog(metrics["name"], metrics["method"], metrics["beta"], metrics["seed"], metrics, final,
                           read_json(run_dir / "masks.json"), config, dict(sorted(evals.items()))))
    order = list(study.arms)
    runs.sort(key=lambda r: (order.index(r.method), r.beta, r.seed))
    return runs, reference


def by_method(runs: list[RunLog]) -> dict[str, list[RunLog]]:
    """The runs grouped by method, in the order given."""
    groups: dict[str, list[RunLog]] = defaultdict(list)
    for r in runs:
        groups[r.method].append(r)
    return dict(groups)


def zeros_curve(train: dict[str, Any], kind: str) -> tuple[list[float], list[float]] | None:
    """Steps and % exact zeros of the ``kind`` mask (mean of chosen and rejected); None when it was not logged."""
    chosen, rejected = (train.get(f"train/masks/sparsity_{kind}_{side}") for side in ("chosen", "rejected"))
    if not chosen or not rejected:
        return None
    return [s for s, _ in chosen], [(a[1] + b[1]) / 2 for a, b in zip(chosen, rejected, strict=True)]
