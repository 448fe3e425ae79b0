"""Launching ``tests/distributed_run.py`` on 2 CPU processes (gloo) from a test, and the modes that every test
session runs once in one launch (the ``ranks_by_mode`` fixture in ``conftest.py``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "distributed_run.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env() -> dict[str, str]:
    """Environment of a 2-process gloo run on 127.0.0.1: a free port, loopback, one thread per rank, the repo
    importable, and no rank variables inherited from a launcher around pytest."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
        env.pop(key, None)
    return env


def launch_many(modes: list[str], out: Path, model_dir: str, pairs: str, timeout: int = 900) -> dict[str, list[dict]]:
    """Run ``distributed_run.py`` on 2 ranks for several modes in one launch (one process start and process-group
    set-up for all); returns what each rank saved per mode, in rank order."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, str(SCRIPT), ",".join(modes), str(out), model_dir, pairs], cwd=REPO,
                          env=rank_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{modes} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return load_ranks(out, modes)


def load_ranks(out: Path, modes: list[str]) -> dict[str, list[dict]]:
    """What each of the 2 ranks saved under ``out`` per mode, in rank order."""
    return {m: [torch.load(out / m / f"rank{r}.pt", weights_only=False) for r in range(2)] for m in modes}


SHARED_MODES = ["ddp", "fsdp2", "fsdp1", "fsdp2_meta", "fsdp2_lora", "fsdp2_lora_meta", "fsdp2_clip", "fsdp2_chunks",
                "fsdp2_frozen", "fsdp2_bf16_ac", "ddp_packed", "fsdp2_packed", "ddp_budget", "fsdp2_resume",
                "fsdp1_resume", "fsdp2_export", "fsdp1_export", "ddp_statistics", "fsdp2_tied", "fsdp2_meta_tied",
                "fsdp2_sparse", "fsdp2_aligndistil", "ddp_reference_cache", "fsdp2_reference_cache", "ddp_treg",
                "fsdp2_treg", "ddp_treg_packed", "fsdp2_treg_packed", "fsdp2_treg_policy"]
"""The 2-rank runs on the tiny model that every session makes once, in one launch (``ranks_by_mode``)."""
