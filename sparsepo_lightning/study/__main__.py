"""``sparsepo study sentiment {run,report,plan}`` (also ``python -m sparsepo_lightning.study``): the sentiment study.

    sparsepo study sentiment run              # build the data, train + evaluate every run (resumable)
    sparsepo study sentiment run --limit 5    # at most 5 runs in this sitting
    sparsepo study sentiment report           # regenerate reports/sentiment/README.md + figures from the logs
    sparsepo study sentiment plan             # list the runs and whether they are done

Settings (``--steps``, ``--betas``, ``--seeds``, ...) default to the CPU-sized study; the report is generated from
the per-run logs under ``--out`` only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from sparsepo_lightning.study.plan import StudySettings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsepo study",
                                description="Controlled credit-granularity study on offline sentiment.")
    p.add_argument("study", choices=["sentiment"])
    p.add_argument("action", choices=["run", "report", "plan", "rescore"],
                   help="run: train and evaluate what is missing; report: regenerate the report from the logs; plan: "
                        "list the runs; rescore: add the second scorer's rewards to evaluated runs from their samples")
    p.add_argument("--out", type=Path, default=Path("reports/sentiment"), help="Per-run logs and the report.")
    p.add_argument("--work", type=Path, default=None,
                   help="Data, checkpoints and raw logs (default: <cache>/study, git-ignored).")
    p.add_argument("--device", default="cpu", help="Torch device for the pair builder (training uses the CLI's "
                   "auto accelerator).")
    p.add_argument("--limit", type=int, default=None, help="Stop after this many runs in this sitting.")
    p.add_argument("--only", nargs="+", default=None, help="Only these methods (e.g. dpo sparsepo_common).")
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


def settings_from(args: argparse.Namespace, out: Path) -> StudySettings:
    """Settings from the flags; for ``report``/``plan`` without flags, the ones recorded in ``<out>/study.json``."""
    recorded = out / "study.json"
    base = StudySettings()
    if args.action != "run" and recorded.is_file():
        values = json.loads(recorded.read_text())["settings"]
        base = StudySettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(StudySettings)
                 if getattr(args, f.name) is not None}
    return dataclasses.replace(base, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    logging.getLogger("sparsepo_lightning").setLevel(logging.INFO)  # progress; other libraries' INFO is noise
    from sparsepo_lightning.model_sources import cache_dir
    from sparsepo_lightning.study import driver, report
    from sparsepo_lightning.study.plan import Paths, config_key, plan

    settings = settings_from(args, args.out)
    paths = Paths(out=args.out, work=args.work or cache_dir() / "study")
    if args.action == "run":
        done = driver.run_study(settings, paths, args.device, args.limit, args.only)
        print(f"{len(done)} runs done in this sitting: {', '.join(done) or '-'}")
        report.write_report(args.out)
    elif args.action == "report":
        print(report.write_report(args.out))
    elif args.action == "rescore":
        done = driver.rescore(paths)
        print(f"rescored {len(done)} runs with {driver.SECOND_SCORER}: {', '.join(done) or '-'}")
        report.write_report(args.out)
    else:
        for run in plan(settings):
            try:
                key = config_key(driver.run_config(settings, paths, run))
                state = "done" if (paths.run_dir(run, key) / "eval.json").is_file() else "to do"
            except RuntimeError:
                key, state = "?", "waits for its matched run"
            print(f"{run.name:<40} {key:<10} {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
