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
- per arm, the median step time over all measured steps of all repeats, and the overhead as the median of the
  per-repeat ratios (repeat i of each arm paired, run back to back) minus one, with their min and max: the
  end-to-end view, which a drift of the machine between two runs moves by several per cent on a shared 2-core box;
- within each run with the statistics, the time spent in the hooks of ``MaskStatistics``, ``RewardStatistics`` and
  ``LearningRateMonitor`` (every ``on_*`` method, timed in the run itself), per optimizer step and as a share of the
  run's median step time: the low-noise view of the same cost, without the extra TensorBoard writes (about 60
  scalars per step, tens of microseconds each) and the learned mask's unit hooks (one ``amax`` per forward).

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


def fit_args(exact: str, steps: int, save_dir: Path) -> list[str]:
    """The quickstart for ``steps`` optimizer steps, no validation or checkpoints, ``--exact_statistics exact``."""
    return ["fit", "--config", "configs/quickstart.yaml", "--trainer.logger.init_args.save_dir", str(save_dir),
            "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps",
            "0", "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]", "--exact_statistics", exact]


def worker(exact: str, steps: int, save_dir: Path) -> None:
    """Run the quickstart in this process with the statistics callbacks' hooks timed; write the total seconds spent
    in them to ``save_dir/hook_seconds.json``."""
    import time

    from lightning.pytorch.callbacks import LearningRateMonitor

    from sparsepo_lightning.callbacks import MaskStatistics, RewardStatistics
    from sparsepo_lightning.cli import run

    spent = [0.0]

    def timed(method):  # noqa: ANN001, ANN202
        def hook(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start
        return hook

    for cls in (MaskStatistics, RewardStatistics, LearningRateMonitor):
        for name in [n for n in dir(cls) if n.startswith("on_") and callable(getattr(cls, n))]:
            setattr(cls, name, timed(getattr(cls, name)))
    run(fit_args(exact, steps, save_dir))
    (save_dir / "hook_seconds.json").write_text(json.dumps({"seconds": spent[0], "steps": steps}))


def run_arm(exact: str, steps: int, save_dir: Path) -> tuple[list[float], float]:
    """One quickstart run (a fresh process); its step times and the seconds spent in the statistics hooks."""
    args = [sys.executable, __file__, "--worker", exact, "--steps", str(steps), "--save-dir", str(save_dir)]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"quickstart ({exact}) failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    log_dir = next(save_dir.glob("quickstart*/version_*"))
    return step_times(log_dir, TAGS[exact]), json.loads((save_dir / "hook_seconds.json").read_text())["seconds"]


def summarise(times: dict[str, list[list[float]]], hooks: list[float], steps: int, skip: int) -> dict:
    """Medians per arm, the end-to-end overhead (median of the paired per-repeat ratios − 1, with min and max) and
    the in-run hook time per step and as a share of the run's median step time (median over repeats)."""
    measured = {arm: [runs[skip:] for runs in repeats] for arm, repeats in times.items()}
    median = {arm: statistics.median([t for run in runs for t in run]) for arm, runs in measured.items()}
    per_repeat = [statistics.median(on) / statistics.median(off) - 1
                  for on, off in zip(measured["true"], measured["false"], strict=True)]
    hook_share = [seconds / steps / statistics.median(run)
                  for seconds, run in zip(hooks, measured["true"], strict=True)]
    return {"median_seconds_per_step": {"with_statistics": median["true"], "without": median["false"]},
            "overhead": statistics.median(per_repeat), "overhead_per_repeat": per_repeat,
            "overhead_min": min(per_repeat), "overhead_max": max(per_repeat),
            "hook_seconds_per_step": statistics.median(s / steps for s in hooks),
            "hook_share": statistics.median(hook_share), "hook_share_max": max(hook_share)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=14, help="optimizer steps per run")
    parser.add_argument("--skip", type=int, default=3, help="first step intervals left out of each run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per arm (alternating)")
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--worker", choices=sorted(TAGS), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--save-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args.steps, args.save_dir)
        return 0
    times: dict[str, list[list[float]]] = {"true": [], "false": []}
    hooks: list[float] = []
    for repeat in range(args.repeats):
        for exact in ("true", "false") if repeat % 2 == 0 else ("false", "true"):
            with tempfile.TemporaryDirectory() as tmp:
                steps, hook_seconds = run_arm(exact, args.steps, Path(tmp))
            times[exact].append(steps)
            if exact == "true":
                hooks.append(hook_seconds)
            print(f"repeat {repeat} exact_statistics={exact}: median {statistics.median(steps[args.skip:]):.3f} s/step"
                  + (f", statistics hooks {hook_seconds / args.steps:.3f} s/step" if exact == "true" else ""),
                  flush=True)
    result = {"command": "python benchmarks/bench_statistics.py " + " ".join(argv or sys.argv[1:]),
              "recipe": "configs/quickstart.yaml", "steps": args.steps, "skip": args.skip, "repeats": args.repeats,
              "machine": f"{platform.machine()}, {platform.python_version()}", "step_seconds": times,
              "hook_seconds": hooks, **summarise(times, hooks, args.steps, args.skip)}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"exact statistics: {result['hook_share']:.1%} of the step time in their hooks (max "
          f"{result['hook_share_max']:.1%}); end to end {result['overhead']:+.1%} (per repeat "
          f"{result['overhead_min']:+.1%} to {result['overhead_max']:+.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
