"""Memory counters of this process from ``/proc/self/status`` (Linux), shared by the benchmark scripts."""

from __future__ import annotations

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
