"""Run the quickstart exactly as ``make quickstart`` does and record its summary in ``results/quickstart.json``.

The README's quickstart numbers are copied from that file (``tests/test_quickstart.py`` checks that they match it,
and that a fresh run still learns in the same direction and lands near it). Rerun after any change that can move
them (an RNG order, a default, the data)::

    python benchmarks/quickstart.py            # about 5 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "quickstart.json"
COMMAND = ["fit", "--config", "configs/quickstart.yaml"]


FIRST_STEPS = 4
"""How many training steps of the real quickstart the test runs (``tests/test_quickstart.py``)."""

STOP_AFTER_FIRST_STEPS = [
    "--trainer.num_sanity_val_steps", "0", "--trainer.val_check_interval", str(FIRST_STEPS),
    "--trainer.limit_val_batches", "1", "--trainer.enable_checkpointing", "false",
    "--trainer.callbacks", "[]", "--trainer.callbacks+=lightning.pytorch.callbacks.EarlyStopping",
    "--trainer.callbacks.monitor", "val/rewards/accuracy", "--trainer.callbacks.mode", "max",
    "--trainer.callbacks.stopping_threshold", "-1.0", "--trainer.callbacks.check_on_train_epoch_end", "false"]
"""Extra arguments that end the quickstart after its first ``FIRST_STEPS`` training steps with the learning-rate
schedule of the whole run unchanged (a one-batch validation at that step, whose early-stopping threshold is always
met; no sanity validation, no 1.6 GB checkpoint): the same first steps as the full run, in a fraction of its time."""


def train_losses(log_dir: Path) -> list[float]:
    """``train_step/loss`` (the exact loss of each optimizer step) in step order, from the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0}).Reload().Scalars("train_step/loss")
    return [event.value for event in sorted(events, key=lambda event: event.step)]


def run_quickstart(save_dir: Path, extra: list[str] | None = None) -> dict:
    """``sparsepo fit --config configs/quickstart.yaml`` with its logs under ``save_dir``; returns summary.json."""
    args = [sys.executable, "-m", "sparsepo_lightning.cli", *COMMAND, "--trainer.logger.init_args.save_dir",
            str(save_dir), *(extra or [])]
    start = time.perf_counter()
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"quickstart failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    # The log name is the recipe's plus each later --config that changes the method or data (quickstart-learned, ...)
    summary_file = next(save_dir.glob("quickstart*/version_*/summary.json"))
    summary = json.loads(summary_file.read_text())
    summary["wall_seconds"] = round(time.perf_counter() - start, 1)
    summary["train_loss"] = train_losses(summary_file.parent)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        summary = run_quickstart(Path(tmp))
    summary["command"] = "sparsepo " + " ".join(COMMAND)
    summary["machine"] = f"{platform.machine()}, {platform.python_version()}"
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    from sparsepo_lightning.callbacks.summary import format_summary

    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
