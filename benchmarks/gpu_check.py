"""One-call device check (``make gpu-check``): every CUDA path and the full-depth ratios, within 8 minutes on one H100.

Checks, in order, each in a fresh process with its own time limit (the sum stays within ``--budget`` seconds):

- ``cuda_tests``: the test suite's CUDA tests (``pytest -m gpu``: FSDP1 and FSDP2 with bf16-mixed);
- ``fsdp2_bf16``: one training step of SmolLM2-135M under ``ModelParallelStrategy`` (FSDP2, one GPU) with bf16
  compute (``fsdp_param_dtype``), activation checkpointing and ``meta_init``, as ``configs/distributed/fsdp2.yaml``;
- ``packed_sdpa``: one training step on the packed layout (``data.layout: packed``) with ``sdpa``;
- ``packed_flex``: one training step on the packed layout with ``flex_attention`` (a ``BlockMask``: the kernel
  skips the fully masked blocks);
- ``side_by_side``: ``bench_dpo.py`` at full depth (all 30 blocks), T = 2048, 4 pairs: TRL's ``DPOTrainer``, the
  floor, our DPO, TDPO1 and SparsePO, ratios against TRL measured in the same run, written to
  ``benchmarks/results/gpu_side_by_side.json``.

Each check is a line of ``benchmarks/results/gpu_check.json`` (ok, seconds, what it printed last); the script exits 1
if any failed. On a machine without CUDA it says so and exits 0 (nothing to check). ``--dry-run`` prints the plan
and the commands without running anything; ``--accelerator cpu --model <dir>`` runs the training-step checks on a
CPU with a small model (how the test suite checks them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("cuda_tests", "fsdp2_bf16", "packed_sdpa", "packed_flex", "side_by_side")
LIMITS = {"cuda_tests": 120, "fsdp2_bf16": 60, "packed_sdpa": 45, "packed_flex": 75, "side_by_side": 180}
"""Seconds per check on one H100 (the sum, 480 s, is the 8-minute budget); a check never gets more than is left."""
SIDE_BY_SIDE = ["--layers", "30", "--lengths", "2048", "--pairs", "4", "--steps", "3",
                "--configs", "trl,floor,dpo,tdpo1,sparsepo_common"]
TRAIN_FILE = ROOT / "data/quickstart/train.jsonl"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {', '.join(CHECKS)}")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all checks together")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/gpu_check.json"))
    parser.add_argument("--model", default="smollm2-135m", help="model of the training-step checks")
    parser.add_argument("--accelerator", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: run the training-step checks on the CPU (for testing the script)")
    parser.add_argument("--dry-run", action="store_true", help="print the checks and their commands, run nothing")
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)  # worker: one training-step check
    args = parser.parse_args(argv)
    args.checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = [c for c in args.checks if c not in CHECKS]
    if unknown:
        parser.error(f"--checks: unknown {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    if args.budget <= 0:
        parser.error(f"--budget={args.budget}: must be > 0 seconds")
    return args


def command(check: str, args: argparse.Namespace) -> list[str]:
    """The process that runs ``check``."""
    if check == "cuda_tests":
        return [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-n", "0", "tests"]
    if check == "side_by_side":
        out = Path(args.out).with_name("gpu_side_by_side.json")
        return [sys.executable, str(ROOT / "benchmarks/bench_dpo.py"), *SIDE_BY_SIDE, "--out", str(out)]
    return [sys.executable, __file__, "--step", check, "--model", args.model, "--accelerator", args.accelerator]


def run_check(check: str, args: argparse.Namespace, limit: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    try:
        done = subprocess.run(command(check, args), capture_output=True, text=True, timeout=limit, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"check": check, "ok": False, "seconds": round(limit, 1), "detail": f"timeout after {limit:.0f} s"}
    tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
    return {"check": check, "ok": done.returncode == 0, "seconds": round(time.perf_counter() - start, 1),
            "detail": " | ".join(tail)}


def training_step(check: str, model: str, accelerator: str) -> dict[str, Any]:
    """One optimizer step of DPO on the quickstart pairs for ``check`` (``fsdp2_bf16``, ``packed_sdpa`` or
    ``packed_flex``); returns the loss and the peak memory. Raises if the loss is not finite."""
    import torch
    from lightning.pytorch import Callback, Trainer
    from lightning.pytorch.strategies import ModelParallelStrategy

    from sparsepo_lightning.data import PreferenceDataModule
    from sparsepo_lightning.module import PreferenceModule
    from sparsepo_lightning.objectives import DPO

    options: dict[str, Any] = {"fsdp2_bf16": {"fsdp_param_dtype": "bfloat16", "activation_checkpointing": True,
                                              "meta_init": True},
                               "packed_sdpa": {"attn_implementation": "sdpa"},
                               "packed_flex": {"attn_implementation": "flex_attention"}}[check]
    module = PreferenceModule(model=model, objective=DPO(), lr=1e-6, warmup_ratio=0.0, **options)
    data = PreferenceDataModule(tokenizer=model, train_file=str(TRAIN_FILE), batch_size=8, max_length=256,
                                max_prompt_length=128, layout="padded" if check == "fsdp2_bf16" else "packed",
                                cache_tokenised=False, max_train_samples=64)
    losses: list[float] = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))

    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1) if check == "fsdp2_bf16" else "auto"
    trainer = Trainer(accelerator=accelerator, devices=1, strategy=strategy, max_steps=1, limit_val_batches=0,
                      num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tempfile.mkdtemp(), callbacks=[Record()])
    trainer.fit(module, datamodule=data)
    if len(losses) != 1 or not torch.isfinite(torch.tensor(losses)).all():
        raise RuntimeError(f"{check}: expected one finite loss, got {losses}")
    peak = torch.cuda.max_memory_allocated() / 2**20 if accelerator == "cuda" else None
    return {"check": check, "loss": losses[0], "peak_mib": peak}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.step:
        print(json.dumps(training_step(args.step, args.model, args.accelerator)))
        return 0
    if args.dry_run:
        for check in args.checks:
            print(f"{check} (≤ {LIMITS[check]} s): {' '.join(command(check, args))}")
        return 0
    import torch

    if args.accelerator == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine; nothing to check (run it where a GPU is available).")
        return 0
    deadline = time.perf_counter() + args.budget
    results = []
    for check in args.checks:
        left = deadline - time.perf_counter()
        if left < 5:
            results.append({"check": check, "ok": False, "seconds": 0.0, "detail": "skipped: budget spent"})
            continue
        results.append(run_check(check, args, min(LIMITS[check], left)))
        print(f"{check}: {'ok' if results[-1]['ok'] else 'FAILED'} in {results[-1]['seconds']} s "
              f"({results[-1]['detail']})", flush=True)
    device = torch.cuda.get_device_name(0) if args.accelerator == "cuda" else "cpu"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": device, "torch": torch.__version__, "budget_s": args.budget,
                                          "results": results}, indent=1) + "\n")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
