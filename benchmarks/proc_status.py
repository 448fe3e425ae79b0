"""Memory counters of this process from ``/proc/self/status`` (Linux), shared by the benchmark scripts."""

from __future__ import annotations

from pathlib import Path


def status_kib(field: str) -> int:
    """The value of ``field`` (``VmRSS``, ``VmHWM``, ``RssAnon``...) in KiB.

    Raises:
        RuntimeError: the field is not there (not Linux, or an older kernel).
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")
