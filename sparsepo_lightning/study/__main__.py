"""``sparsepo study sentiment {run,report,plan}`` (also ``python -m sparsepo_lightning.study``): a study plan's runs.

    sparsepo study sentiment run --plan configs/study/sentiment_controls.yaml          # resumable
    sparsepo study sentiment run --plan configs/study/sentiment_controls.yaml --limit 5  # at most 5 runs now
    sparsepo study sentiment report --plan configs/study/sentiment_controls.yaml   # README.md + figures from logs
    sparsepo study sentiment plan --plan configs/study/sentiment_controls.yaml     # the runs and what is done

Without ``--plan``: the plan recorded in ``<out>/study.json``, else the first study (``configs/study/sentiment.yaml``).
Settings flags (``--steps``, ``--betas``, ``--seeds``, ...) override the plan's; the report is generated from the
per-run logs under ``--out`` (default ``reports/<plan name>``) only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from sparsepo_lightning.study.plan import Paths, StudySettings
from sparsepo_lightning.study.planfile import DEFAULT_PLAN, PlanError, StudyPlan, load_plan, plan_from_record


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsepo study",
                                description="Controlled credit-granularity study on offline sentiment.")
    p.add_argument("study", choices=["sentiment"])
    p.add_argument("action", choices=["run", "report", "plan", "rescore"],
                   help="run: train and evaluate what is missing; report: regenerate the report from the logs; plan: "
                        "list the runs; rescore: add the second scorer's rewards to evaluated runs from their samples")
    p.add_argument("--plan", type=Path, default=None,
                   help="The study plan (YAML; default: the one recorded in <out>/study.json, else the first study's, "
                        "configs/study/sentiment.yaml).")
    p.add_argument("--out", type=Path, default=None, help="Per-run logs and the report (default reports/<name>).")
    p.add_argument("--work", type=Path, default=None,
                   help="Data, checkpoints and raw logs (default: <cache>/study, git-ignored).")
    p.add_argument("--device", default="cpu", help="Torch device for the pair builder (training uses the CLI's "
                   "auto accelerator).")
    p.add_argument("--limit", type=int, default=None, help="Stop after this many runs in this sitting.")
    p.add_argument("--only", nargs="+", default=None, help="Only these arms of the plan (e.g. dpo sparsepo_common).")
    defaults = StudySettings()
    for f in dataclasses.fields(StudySettings):
        value = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, tuple):
            p.add_argument(flag, nargs="+", type=type(value[0]), default=None,
                           help=f"default {' '.join(map(str, value))}")
        else:
            p.add_argument(flag, type=type(value), default=None, help=f"default {value}")
    return p


def study_from(args: argparse.Namespace) -> tuple[StudyPlan, Path]:
    """The plan (``--plan``, else the one recorded in ``<out>/study.json``, else the first study's) with, for
    report/plan, the settings of the recorded runs, and the flags applied; and the output folder."""
    plan = load_plan(args.plan) if args.plan is not None else None
    out = args.out or Path("reports") / (plan.name if plan else "sentiment")
    recorded = out / "study.json"
    record = json.loads(recorded.read_text()) if recorded.is_file() else None
    if plan is None:
        plan = plan_from_record(record["plan"], str(recorded)) if record and "plan" in record else \
            load_plan(DEFAULT_PLAN)
    if record is not None and args.action != "run":
        plan = plan.with_settings(**{k: tuple(v) if isinstance(v, list) else v
                                     for k, v in record["settings"].items()})
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(StudySettings)
                 if getattr(args, f.name) is not None}
    return plan.with_settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}), out


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    logging.getLogger("sparsepo_lightning").setLevel(logging.INFO)  # progress; other libraries' INFO is noise
    from sparsepo_lightning.model_sources import cache_dir
    from sparsepo_lightning.study import driver, report
    from sparsepo_lightning.study.machine import stop_on_sigterm

    try:
        study, out = study_from(args)
    except PlanError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    unknown = set(args.only or ()) - set(study.arms)
    if unknown:
        print(f"error: --only {' '.join(sorted(unknown))}: not an arm of the plan. Fix: one of "
              f"{', '.join(study.arms)}.", file=sys.stderr)
        return 2
    paths = Paths(out=out, work=args.work or cache_dir() / "study")
    if args.action == "run":
        with stop_on_sigterm():
            done = driver.run_study(study, paths, args.device, args.limit, args.only)
        print(f"{len(done)} runs done in this sitting: {', '.join(done) or '-'}")
        report.write_report(out, study)
    elif args.action == "report":
        print(report.write_report(out, study))
    elif args.action == "rescore":
        scorer = study.scorers[1] if len(study.scorers) > 1 else driver.SECOND_SCORER
        done = driver.rescore(paths, scorer)
        print(f"rescored {len(done)} evaluations with {scorer}: {', '.join(done) or '-'}")
        report.write_report(out, study)
    else:
        show_plan(study, paths, out)
    return 0


def show_plan(study: StudyPlan, paths: Paths, out: Path) -> None:
    """Each planned run's key and state (done, running: a driver holds its claim, to do), then the counts and the
    run time left at the median cost of the runs done."""
    from collections import Counter

    from sparsepo_lightning.study import driver, report
    from sparsepo_lightning.study.logs import load_runs
    from sparsepo_lightning.study.machine import held
    from sparsepo_lightning.study.plan import config_key, plan

    steps, states = study.eval_steps(), Counter()
    for run in plan(study):
        try:
            key = config_key(driver.run_config(study, paths, run))
            run_dir = paths.run_dir(run, key)
            state = "done" if all(driver.eval_file(run_dir, s, steps[-1]).is_file() for s in steps) else \
                "running" if held(paths.work, key) else "to do"
        except RuntimeError:
            key, state = "?", "waits for its matched run"
        states[state] += 1
        print(f"{run.name:<40} {key:<10} {state}")
    order, total = ("done", "running", "to do", "waits for its matched run"), sum(states.values())
    line = f"{total} runs: " + ", ".join(f"{states[s]} {s}" for s in order if states[s])
    minutes = report.run_minutes(load_runs(out, study)[0]) if out.is_dir() else None
    if minutes is not None and states["done"] < total:
        left = (total - states["done"]) * (minutes[0] + minutes[1]) / 60
        line += (f"; about {left:.1f} h of {minutes[3]} run time left at the median cost of {minutes[2]} runs done "
                 "(divided among the drivers that run side by side)")
    print(line)


if __name__ == "__main__":
    sys.exit(main())
