"""The operating-system boundary holds when the in-process guard is defeated on purpose.

Every escape program below first undoes the guard the way hostile code would: the guard replaces functions of the
``posix``, ``_io`` and ``_socket`` modules, and a fresh import of those modules brings the originals back. Then it
writes and deletes files outside its folder, spawns and detaches processes, reads the parent's files and
environment, and connects to a listener this test opens on 127.0.0.1 (the only address any test touches). With the
bubblewrap boundary all of it stays inside; ``test_the_escapes_are_real_without_the_boundary`` shows the same
programs do get out when only the guard stands in the way, so these tests can fail.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import subprocess
import time
from pathlib import Path

import pytest

from sparsepo_lightning import sandbox
from sparsepo_lightning.sandbox import PASSED, TIMEOUT, SandboxConfig, boundary, boundary_available, run_program

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not boundary_available(), reason="bubblewrap cannot run here (see the warning)")

DEFEAT = """import sys
for _name in ("posix", "_io", "_socket"):  # the guard patched these modules; a fresh import restores them
    sys.modules.pop(_name, None)
import posix, _io, _socket
posix.fork  # the original, not the guard's
"""

BOUNDED = SandboxConfig(timeout=10.0, memory_mb=512, boundary=True)
GUARD_ONLY = SandboxConfig(timeout=10.0, memory_mb=512, boundary=False)


def _write(target: Path) -> str:
    return DEFEAT + (
        f"fd = posix.open({str(target)!r}, posix.O_WRONLY | posix.O_CREAT, 0o644)\n"
        "posix.write(fd, b'escaped')\nposix.close(fd)\n"
    )


def test_the_guard_is_really_defeated_inside_the_boundary():
    """The defeat works (so the boundary, not the guard, is what the tests below exercise)."""
    result = run_program(DEFEAT + "pid = posix.fork()\nif pid == 0:\n    posix._exit(0)\nposix.waitpid(pid, 0)\n"
                         "fd = posix.open('/tmp/inside', posix.O_WRONLY | posix.O_CREAT)\nprint('forked')\n", BOUNDED)
    assert result.status == PASSED and result.stdout == "forked\n", result.stderr


def test_writing_outside_the_folder_is_contained(tmp_path: Path):
    target = tmp_path / "outside.txt"
    for place, error in ((target, "FileNotFoundError"), (Path("/usr") / f"escape-{secrets.token_hex(4)}", "Read-only")):
        result = run_program(_write(place), BOUNDED)
        assert not place.exists(), f"the sandboxed program created {place}"
        assert result.status != PASSED and error in result.stderr  # tmp_path is not there; /usr is read-only


def test_deleting_outside_the_folder_is_contained(tmp_path: Path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    result = run_program(DEFEAT + f"posix.unlink({str(victim)!r})\n", BOUNDED)
    assert result.status != PASSED and "FileNotFoundError" in result.stderr  # the parent's files are not there
    assert victim.read_text() == "precious"
    result = run_program(DEFEAT + "posix.unlink('/usr/bin/env')\n", BOUNDED)
    assert result.status != PASSED and "Read-only file system" in result.stderr
    assert Path("/usr/bin/env").exists()


def test_a_spawned_process_is_contained(tmp_path: Path):
    target = tmp_path / "spawned.txt"
    program = DEFEAT + (
        "pid = posix.fork()\n"
        "if pid == 0:\n"
        f"    posix.execv('/bin/sh', ['sh', '-c', 'echo escaped > {target}; echo escaped > /usr/spawned'])\n"
        "print('exit', posix.waitpid(pid, 0)[1])\n"
    )
    result = run_program(program, BOUNDED)
    assert result.status == PASSED and "exit 0" not in result.stdout, result.stdout  # the shell ran, and failed
    assert not target.exists() and not Path("/usr/spawned").exists()


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:  # it exited meanwhile
                continue
    return found


def _detach(marker: str) -> str:
    return DEFEAT + (
        "pid = posix.fork()\n"
        "if pid == 0:\n"
        "    posix.setsid()\n"
        "    if posix.fork() == 0:\n"
        f"        posix.execv('/bin/sleep', ['sleep', {marker!r}])\n"
        "    posix._exit(0)\n"
        "posix.waitpid(pid, 0)\n"
    )


@pytest.mark.parametrize(("then", "status"), [("", PASSED), ("while True:\n    pass\n", TIMEOUT)],
                         ids=["returns", "times-out"])
def test_a_detached_child_does_not_outlive_the_run(then: str, status: str):
    marker = f"{300 + secrets.randbelow(10**6) / 10**6:.6f}"  # `sleep 300.xxxxxx`: a unique command line
    try:
        result = run_program(_detach(marker) + then, SandboxConfig(timeout=3.0, memory_mb=512, boundary=True))
        assert result.status == status, result.stderr
        deadline = time.monotonic() + 2.0
        while _processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _processes_with(marker), "a process of the sandboxed program outlived the run"
    finally:
        for pid in _processes_with(marker):
            os.kill(pid, 9)


def test_the_parent_environment_and_files_are_invisible(tmp_path: Path):
    secret = f"sparsepo-secret-{secrets.token_hex(8)}"
    (tmp_path / "secret.txt").write_text(secret)
    holder = subprocess.Popen(["sleep", "60"], env={"PATH": "/usr/bin:/bin", "SPARSEPO_SECRET": secret})
    try:
        program = DEFEAT + (
            "for pid in posix.listdir('/proc'):\n"
            "    if pid.isdigit():\n"
            "        try:\n"
            "            print(_io.open(f'/proc/{pid}/environ', 'rb').read())\n"
            "        except OSError:\n"
            "            pass\n"
            f"for path in ({str(tmp_path / 'secret.txt')!r}, {str(ROOT / 'pyproject.toml')!r}, '/etc/shadow'):\n"
            "    try:\n"
            "        print(path, _io.open(path).read()[:40])\n"
            "    except OSError as e:\n"
            "        print(path, type(e).__name__)\n"
        )
        result = run_program(program, BOUNDED)
        assert result.status == PASSED, result.stderr
        assert secret not in result.stdout and "sparsepo-lightning" not in result.stdout
        assert result.stdout.count("FileNotFoundError") == 3 and "root:" not in result.stdout
    finally:
        holder.kill()
        holder.wait()


def test_the_local_listener_is_unreachable():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        program = DEFEAT + f"s = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\n"
        result = run_program(program, BOUNDED)
        assert result.status != PASSED and ("refused" in result.stderr or "unreachable" in result.stderr)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever connected


def test_the_escapes_are_real_without_the_boundary(tmp_path: Path):
    """The same programs get out when only the guard stands in the way (what the boundary is for)."""
    target = tmp_path / "outside.txt"
    assert run_program(_write(target), GUARD_ONLY).status == PASSED
    assert target.read_text() == "escaped"
    marker = f"{300 + secrets.randbelow(10**6) / 10**6:.6f}"
    try:
        assert run_program(_detach(marker), GUARD_ONLY).status == PASSED
        time.sleep(0.2)
        assert _processes_with(marker), "without the boundary the detached child survives the run"
    finally:
        for pid in _processes_with(marker):
            os.kill(pid, 9)


def test_the_guard_still_stops_plain_attempts_inside_the_boundary(tmp_path: Path):
    result = run_program(f"open({str(tmp_path / 'x')!r}, 'w')\n", BOUNDED)
    assert result.status != PASSED and "PermissionError: sandbox: writing outside" in result.stderr


def test_no_boundary_is_said_once_loudly(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    monkeypatch.setattr(boundary, "bwrap_binary", lambda: None)
    probe = boundary.boundary_available.__wrapped__  # the uncached probe
    with caplog.at_level(logging.WARNING, logger=boundary.__name__):
        assert probe("python-for-this-test") is False
    assert "NO OPERATING-SYSTEM BOUNDARY" in caplog.text and "no bwrap found" in caplog.text


def test_required_boundary_that_cannot_be_set_up_raises(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sandbox, "boundary_available", lambda python=None: False)
    with pytest.raises(RuntimeError, match="SandboxConfig.boundary=True.*Fix"):
        run_program("pass\n", SandboxConfig(boundary=True))
    assert run_program("pass\n", SandboxConfig(boundary=None)).passed  # falls back to today's layers
