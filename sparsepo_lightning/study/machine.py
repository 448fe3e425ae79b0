"""What a study's drivers share: locks that let several ``sparsepo study <task> run`` processes work on one plan
(start the same command in more than one shell or job, and each run is trained and evaluated by exactly one of
them), the subprocesses they run (timed in wall and CPU seconds, stopped with the driver) and the description of
the machine each run records.

A run is claimed by an exclusive lock on ``<work>/claims/<run key>.lock`` (``filelock``: an advisory lock on an open
file, which the operating system releases if its holder dies, so a killed driver leaves no stale claim). A driver
skips a run another driver holds and comes back to nothing: whichever driver reaches a run first completes it. The
shared first steps (the prompts, the pairs, the reference's evaluation) run under one blocking lock, so drivers
started together build them once.
"""

from __future__ import annotations

import os
import platform
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
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


def run_cli(args: Sequence[str], log_file: Path) -> tuple[float, float]:
    """Run ``sparsepo <args>`` in a subprocess (output to ``log_file``); returns its wall time and its CPU time (user
    plus system, of the subprocess and its own children) in seconds. The CPU time is the run's cost: unlike the wall
    time, it does not grow while the run waits for a core or while the study is paused.

    Interrupted (Ctrl-C, or SIGTERM under ``stop_on_sigterm``), it kills the subprocess and waits for it before the
    exception goes on (``subprocess.run`` does so), so no run outlives its driver's claim on it."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    start, cpu = time.perf_counter(), children_cpu()
    with log_file.open("w") as out:
        done = subprocess.run([sys.executable, "-m", "sparsepo_lightning.cli", *args], stdout=out,
                              stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = "".join(log_file.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"`sparsepo {' '.join(args)}` failed (exit {done.returncode}); log {log_file}:\n{tail}")
    return time.perf_counter() - start, children_cpu() - cpu


def children_cpu() -> float:
    """User plus system seconds of this process's finished (waited-for) children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Inside, SIGTERM (a scheduler's pre-emption, ``kill``) stops the driver as Ctrl-C does: ``SystemExit(143)`` is
    raised, the run in progress is killed and waited for (``run_cli``), its claim is released, and the next call
    restarts it. Without this, the driver would die at once and leave the subprocess running unclaimed."""
    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
