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


STOP_AT_FIRST_VALIDATION = [
    "--trainer.callbacks", "[]", "--trainer.callbacks+=lightning.pytorch.callbacks.EarlyStopping",
    "--trainer.callbacks.monitor",
    "val/rewards/accuracy", "--trainer.callbacks.mode", "max", "--trainer.callbacks.stopping_threshold", "-1.0",
    "--trainer.callbacks.check_on_train_epoch_end", "false", "--trainer.enable_checkpointing", "false"]
"""Extra arguments that end the quickstart right after its first validation during training (step 16), with the
learning-rate schedule of the whole run unchanged: the same first 16 steps as the full run, without writing the
1.6 GB checkpoint (used by the test)."""


def run_quickstart(save_dir: Path, extra: list[str] | None = None) -> dict:
    """``sparsepo fit --config configs/quickstart.yaml`` with its logs under ``save_dir``; returns summary.json."""
    args = [sys.executable, "-m", "sparsepo_lightning.cli", *COMMAND, "--trainer.logger.init_args.save_dir",
            str(save_dir), *(extra or [])]
    start = time.perf_counter()
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"quickstart failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    summary_file = next(save_dir.glob("quickstart/version_*/summary.json"))
    summary = json.loads(summary_file.read_text())
    summary["wall_seconds"] = round(time.perf_counter() - start, 1)
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
