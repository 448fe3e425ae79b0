"""What keeping freed memory in the process saves on a CPU: one training step with ``SPARSEPO_CPU_MEMORY=keep`` (what
``sparsepo`` does at start, ``sparsepo_lightning/cpu_memory.py``) against glibc's defaults (``system``).

Each cell is ``bench_dpo.py``'s worker in a fresh process (same model, same synthetic pairs, warm-up, median of the
measured steps), for our DPO (``dpo``) and TRL's ``DPOTrainer`` (``trl``): both take the setting from the environment,
since ``bench_dpo.py``'s worker applies it for every configuration. Rounds alternate which setting runs first; the
ratio ``keep / system`` of CPU seconds is paired within a round, and its median and range over the rounds are
reported, with the kernel seconds (``sys_s``), minor page faults and peak resident memory of both.

Run: ``python benchmarks/bench_cpu_memory.py`` (SmolLM2-135M, all 30 blocks, T = 256, 4 pairs, 2 measured steps,
3 rounds: about 10 minutes on 2 quiet cores) writes ``benchmarks/results/cpu_memory.json``; ``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

from bench_dpo import MODEL, model_path, run_config  # benchmarks/ is on sys.path when a script here runs

from sparsepo_lightning.cpu_memory import ENV

ROOT = Path(__file__).resolve().parents[1]
CHOICES = ("system", "keep")


def summarise(cells: list[dict]) -> list[dict]:
    """Per configuration: medians of both settings and the paired ratios ``keep / system`` (one per round).

    ``cells`` rows carry ``config``, ``round``, ``choice`` and ``bench_dpo``'s measurements; a round where either
    setting failed gives no ratio."""
    out = []
    for config in dict.fromkeys(c["config"] for c in cells):
        rows = [c for c in cells if c["config"] == config and "error" not in c]
        by_round = {}
        for c in rows:
            by_round.setdefault(c["round"], {})[c["choice"]] = c
        pairs = [r for r in by_round.values() if len(r) == 2]
        ratios = [r["keep"]["cpu_s"] / r["system"]["cpu_s"] for r in pairs]
        summary = {"config": config, "rounds": len(pairs)}
        for choice in CHOICES:
            mine = [c for c in rows if c["choice"] == choice]
            for key in ("cpu_s", "step_s", "sys_s", "page_faults", "peak_mib"):
                summary[f"{key}_{choice}"] = statistics.median(c[key] for c in mine) if mine else None
        summary["cpu_keep_vs_system"] = statistics.median(ratios) if ratios else None
        summary["cpu_keep_vs_system_range"] = [min(ratios), max(ratios)] if ratios else None
        out.append(summary)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 block, T = 64, 1 pair, 1 step, 1 round")
    parser.add_argument("--configs", default="dpo,trl")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/cpu_memory.json"))
    args = parser.parse_args()
    if args.quick:
        args.layers, args.length, args.pairs, args.steps, args.repeats = 1, 64, 1, 1, 1
    load_before = os.getloadavg()
    model = model_path(args.layers if args.layers != 30 else None)
    cells = []
    for round_index in range(args.repeats):
        order = CHOICES if round_index % 2 == 0 else CHOICES[::-1]
        for config in args.configs.split(","):
            for choice in order:
                (row,) = run_config(config, [args.length], args.pairs, 1, args.steps, model, timeout=1800,
                                    env={ENV: choice})
                cells.append({**row, "round": round_index, "choice": choice})
                print(json.dumps(cells[-1]), file=sys.stderr, flush=True)
    import torch
    import trl

    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
            "cpu_count": os.cpu_count(), "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
            "torch": torch.__version__, "trl": trl.__version__, "model": MODEL, "layers": args.layers,
            "length": args.length, "pairs": args.pairs, "steps": args.steps, "repeats": args.repeats}
    results = summarise(cells)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results, "cells": cells}, indent=1) + "\n")
    print(json.dumps(meta))
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
