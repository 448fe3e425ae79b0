"""What a study's drivers share: locks that let several ``sparsepo study <task> run`` processes work on one plan
(start the same command in more than one shell or job, and each run is trained and evaluated by exactly one of
them), and the description of the machine each run records.

A run is claimed by an exclusive lock on ``<work>/claims/<run key>.lock`` (``filelock``: an advisory lock on an open
file, which the operating system releases if its holder dies, so a killed driver leaves no stale claim). A driver
skips a run another driver holds and comes back to nothing: whichever driver reaches a run first completes it. The
shared first steps (the prompts, the pairs, the reference's evaluation) run under one blocking lock, so drivers
started together build them once.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout


def _lock(work: Path, name: str) -> FileLock:
    folder = Path(work) / "claims"
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / f"{name}.lock"))


@contextmanager
def claim(work: Path, name: str) -> Iterator[bool]:
    """Yields True while this process holds ``name``'s claim, False (holding nothing) if another process holds it."""
    lock = _lock(work, name)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


@contextmanager
def exclusive(work: Path, name: str) -> Iterator[None]:
    """Waits for ``name``'s lock and holds it inside."""
    with _lock(work, name):
        yield


def held(work: Path, name: str, locks: Path = Path("/proc/locks")) -> bool | None:
    """Whether a process holds ``name``'s lock now, read from the kernel's lock table without taking the lock (taking
    it, even briefly, could make a driver pass over the run); None where that table is not readable (not Linux)."""
    path = Path(work) / "claims" / f"{name}.lock"
    if not path.is_file():
        return False
    try:
        table = locks.read_text()
    except OSError:
        return None
    inode = str(path.stat().st_ino)  # the table names a lock by major:minor:inode of the locked file
    return any(len(fields) > 5 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == inode
               for fields in map(str.split, table.splitlines()))


def hardware() -> str:
    """The machine that runs the study, in words (CPU model and cores, or the GPU; torch version)."""
    import torch

    if torch.cuda.is_available():
        device = f"GPU {torch.cuda.get_device_name(0)}"
    else:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() \
            else platform.processor()
        device = f"CPU only, {len(os.sched_getaffinity(0))} cores ({model})"
    return f"{device}, torch {torch.__version__}, Python {platform.python_version()}"
