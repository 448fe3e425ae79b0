"""What the default exact statistics cost: the quickstart's step time with and without them.

``sparsepo fit`` logs, by default, the exact statistics of every optimizer step (``MaskStatistics`` with the mask
diagnostics and a histogram every 50 steps, ``RewardStatistics``) and the learning rates (``--exact_statistics``).
This runs the real quickstart (``configs/quickstart.yaml``: SmolLM2-135M, the shipped pairs) for ``--steps``
optimizer steps, without validation or checkpoints, once with ``--exact_statistics true`` and once with ``false``,
alternating the two in fresh processes ``--repeats`` times (order ABAB..., so that a drift of the machine hits both),
and records in ``results/statistics.json``:

- the time of each optimizer step, from the wall times of the per-step loss events in the run's TensorBoard log
  (``train_step/loss`` with the statistics, the module's ``train/loss`` without: both written at the end of a step),
  leaving out the first ``--skip`` steps (warm-up of the allocator and the first histogram);
- per arm, the median step time over all measured steps of all repeats; the overhead is the ratio of the two
  medians minus one, and its spread the min/max of the per-repeat ratios (repeat i of each arm paired).

The issue's target is an overhead of at most 5 %. Run on a quiet machine (about 8 minutes on 2 CPU cores)::

    python benchmarks/bench_statistics.py
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "statistics.json"
TAGS = {"true": "train_step/loss", "false": "train/loss"}
"""The per-step loss series of each arm (``--exact_statistics`` value -> TensorBoard tag)."""


def step_times(log_dir: Path, tag: str) -> list[float]:
    """Seconds between consecutive optimizer steps, from the wall times of ``tag``'s events (one per step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(EventAccumulator(str(log_dir), size_guidance={"scalars": 0}).Reload().Scalars(tag),
                    key=lambda event: event.step)
    return [b.wall_time - a.wall_time for a, b in zip(events, events[1:], strict=False)]


def run_arm(exact: str, steps: int, save_dir: Path) -> list[float]:
    """One quickstart run of ``steps`` optimizer steps with ``--exact_statistics exact``; its step times."""
    args = [sys.executable, "-m", "sparsepo_lightning.cli", "fit", "--config", "configs/quickstart.yaml",
            "--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.max_steps", str(steps),
            "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
            "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]", "--exact_statistics", exact]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"quickstart ({exact}) failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    log_dir = next(save_dir.glob("quickstart*/version_*"))
    return step_times(log_dir, TAGS[exact])


def summarise(times: dict[str, list[list[float]]], skip: int) -> dict:
    """Medians per arm, the overhead (ratio of the medians − 1) and the per-repeat overheads."""
    measured = {arm: [runs[skip:] for runs in repeats] for arm, repeats in times.items()}
    median = {arm: statistics.median([t for run in runs for t in run]) for arm, runs in measured.items()}
    per_repeat = [statistics.median(on) / statistics.median(off) - 1
                  for on, off in zip(measured["true"], measured["false"], strict=True)]
    return {"median_seconds_per_step": {"with_statistics": median["true"], "without": median["false"]},
            "overhead": median["true"] / median["false"] - 1,
            "overhead_per_repeat": per_repeat, "overhead_min": min(per_repeat), "overhead_max": max(per_repeat)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=14, help="optimizer steps per run")
    parser.add_argument("--skip", type=int, default=3, help="first step intervals left out of each run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per arm (alternating)")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    times: dict[str, list[list[float]]] = {"true": [], "false": []}
    for repeat in range(args.repeats):
        for exact in ("true", "false") if repeat % 2 == 0 else ("false", "true"):
            with tempfile.TemporaryDirectory() as tmp:
                times[exact].append(run_arm(exact, args.steps, Path(tmp)))
            print(f"repeat {repeat} exact_statistics={exact}: median "
                  f"{statistics.median(times[exact][-1][args.skip:]):.3f} s/step", flush=True)
    result = {"command": "python benchmarks/bench_statistics.py " + " ".join(argv or sys.argv[1:]),
              "recipe": "configs/quickstart.yaml", "steps": args.steps, "skip": args.skip, "repeats": args.repeats,
              "machine": f"{platform.machine()}, {platform.python_version()}", "step_seconds": times,
              **summarise(times, args.skip)}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"overhead of the exact statistics: {result['overhead']:+.1%} (per repeat "
          f"{result['overhead_min']:+.1%} to {result['overhead_max']:+.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
