"""Run the quickstart with a learned common mask at a target sparsity and record it in ``results/sparsity.json``.

The recipe is ``configs/quickstart.yaml`` (SmolLM2-135M, the shipped pairs, seed 42) with
``configs/sparsity/learned.yaml`` on top and ``target_sparsity`` set per run (docs/sparsity.md). For each
target it records the validation runs of the summary (accuracy, margin, share of exact zeros, mean kept weight and
the other mask diagnostics) and checks what the issue asks of a sparse mask that is alive and learns:

- exact zeros on the validation responses within ±5 points of the target at the end;
- mean kept weight (reward mask) ≥ 0.1 at the end;
- validation accuracy ≥ 0.65 at the end, and a margin higher at the end than at step 16.

The dense quickstart (``results/quickstart.json``, ``benchmarks/quickstart.py``) is the reference these criteria
come from. Each target is one quickstart run (about 5 minutes on 2 quiet CPU cores); runs of different targets
may go in parallel processes, each merging its entry into the results file::

    python benchmarks/sparsity.py --target 0.5
    python benchmarks/sparsity.py --target 0.8
"""

from __future__ import annotations

import argparse
import fcntl
import json
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quickstart import COMMAND, ROOT, run_quickstart  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "sparsity.json"
METHOD = ["--config", "configs/sparsity/learned.yaml"]


def _both(row: dict, key: str) -> float:
    """Mean of the chosen and rejected values of a reward-mask diagnostic."""
    diagnostics = row["diagnostics"]
    return (diagnostics[f"{key}_reward_chosen"] + diagnostics[f"{key}_reward_rejected"]) / 2


def verdict(summary: dict, target: float) -> dict:
    """The end-of-run numbers and the four criteria of the module docstring."""
    rows = summary["validations"]
    last = rows[-1]
    at_16 = next(row for row in rows if row["step"] == 16)
    zeros = (last["mask_sparsity_chosen"] + last["mask_sparsity_rejected"]) / 2
    kept = _both(last, "mean_kept")
    return {
        "final_step": last["step"], "zeros_percent": zeros, "mean_kept_weight": kept, "accuracy": last["accuracy"],
        "margin_step_16": at_16["margin"], "margin_final": last["margin"],
        "gini": _both(last, "gini"), "effective_token_ratio": _both(last, "effective_token_ratio"),
        "checks": {"zeros_within_5_points": abs(zeros - 100 * target) <= 5.0, "mean_kept_weight_ge_0.1": kept >= 0.1,
                   "accuracy_ge_0.65": last["accuracy"] >= 0.65, "margin_rises": last["margin"] > at_16["margin"]},
    }


def merge(out: Path, key: str, entry: dict) -> None:
    """Add ``entry`` under ``key`` to the JSON file ``out`` (locked: parallel runs write one file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a+") as file:  # the results file is its own lock
        fcntl.flock(file, fcntl.LOCK_EX)
        file.seek(0)
        text = file.read()
        results = json.loads(text) if text.strip() else {}
        results[key] = entry
        file.seek(0)
        file.truncate()
        file.write(json.dumps(dict(sorted(results.items())), indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, action="append", help="target sparsity (repeatable); default 0.5")
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--logs", type=Path, default=None, help="keep the runs' logs here (default: a temp dir)")
    args = parser.parse_args(argv)
    from sparsepo_lightning.callbacks.summary import format_summary

    for target in args.target or [0.5]:
        extra = [*METHOD, "--model.masker.init_args.target_sparsity", str(target)]
        with tempfile.TemporaryDirectory() as tmp:
            logs = args.logs / f"target_{target}" if args.logs else Path(tmp)
            summary = run_quickstart(logs, extra)
        print(format_summary(summary))
        entry = {"target_sparsity": target, **verdict(summary, target),
                 "command": "sparsepo " + " ".join([*COMMAND, *extra]),
                 "machine": f"{platform.machine()}, {platform.python_version()} (shared CPU cores: timings noisy)",
                 "wall_seconds": summary["wall_seconds"], "validations": summary["validations"]}
        merge(args.out, f"target_{target}", entry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
