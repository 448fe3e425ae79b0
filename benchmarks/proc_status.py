"""Memory counters of this process from ``/proc/self/status`` (Linux), shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def status_kib(field: str) -> int:
    """The value of ``field`` (``VmRSS``, ``VmHWM``, ``RssAnon``...) in KiB.

    Raises:
        RuntimeError: the field is not there (not Linux, or an older kernel).
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def start_peak(device: Any) -> int:
    """Bytes held now by this process on ``device`` (a ``torch.device``), with the peak counter reset: CUDA
    ``memory_allocated`` and ``reset_peak_memory_stats``; CPU ``VmRSS`` and ``echo 5 > /proc/self/clear_refs``."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    before = status_kib("VmRSS") * 1024
    Path("/proc/self/clear_refs").write_text("5")
    return before


def peak_since_start(device: Any) -> int:
    """Peak bytes since :func:`start_peak`: CUDA ``max_memory_allocated``, CPU ``VmHWM``."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return status_kib("VmHWM") * 1024


def memory_parser(description: str, lengths: str, out: Path) -> argparse.ArgumentParser:
    """The options shared by the memory benchmarks (``bench_memory.py``, ``bench_distribution_memory.py``): the
    lengths, the chunk size, the results file, and the hidden ``--worker`` of a fresh measuring process."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--lengths", default=lengths)
    parser.add_argument("--chunk-size", type=int, default=1024, help="response tokens per chunk (module default)")
    parser.add_argument("--out", default=str(out))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def measure_in_fresh_process(script: str, method: str, length: int, chunk_size: int, root: Path) -> dict:
    """Run ``script --worker method`` in a fresh interpreter (its own peak counters) and return the JSON line it
    prints, or ``{"peak_extra_mib": None, "error": <end of stderr>}``."""
    cmd = [sys.executable, script, "--worker", method, "--lengths", str(length), "--chunk-size", str(chunk_size)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)}, cwd=root)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"peak_extra_mib": None, "error": done.stderr[-500:]}
