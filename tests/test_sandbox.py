"""Sandboxed execution: passing/failing programs, timeouts, memory, files, processes, network, environment.

The only network address any test touches is a listener the test itself opens on 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from sparsepo_lightning.sandbox import (
    ERROR,
    FAILED,
    MEMORY,
    PASSED,
    TIMEOUT,
    SandboxConfig,
    network_namespace_available,
    run_program,
    run_programs,
)

FAST = SandboxConfig(timeout=5.0, memory_mb=256)

GOOD = """
def add(a, b):
    return a + b

assert add(1, 2) == 3
assert add(-1, 1) == 0
"""


def test_correct_solution_passes():
    result = run_program(GOOD + "print('done')\n", FAST)
    assert result.passed and result.status == PASSED and result.exit_code == 0
    assert result.stdout == "done\n"  # exactly what the program printed: the pass marker line is removed
    assert result.duration > 0


def test_failing_assert_fails_with_its_traceback():
    result = run_program(GOOD + "assert add(2, 2) == 5\n", FAST)
    assert not result.passed and result.status == FAILED
    assert "AssertionError" in result.stderr and "assert add(2, 2) == 5" in result.stderr


def test_other_exceptions_are_errors():
    assert run_program("def f(:\n    pass\n", FAST).status == ERROR
    assert run_program("undefined_name + 1\n", FAST).status == ERROR


def test_infinite_loop_times_out_and_the_process_group_is_killed():
    result = run_program("while True:\n    pass\n", SandboxConfig(timeout=1.0, memory_mb=256))
    assert result.status == TIMEOUT and not result.passed
    assert result.duration < 4


def test_unbounded_allocation_is_contained():
    program = "chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))\n"
    result = run_program(program, SandboxConfig(timeout=10.0, memory_mb=256))
    assert result.status == MEMORY and not result.passed


@pytest.mark.parametrize(
    "write",
    [
        "open(TARGET, 'w').write('pwned')",
        "import pathlib; pathlib.Path(TARGET).write_text('pwned')",
        "import os; os.close(os.open(TARGET, os.O_WRONLY | os.O_CREAT))",
        "import os; os.symlink('/etc/hostname', TARGET)",
    ],
    ids=["open", "pathlib", "os.open", "symlink"],
)
def test_writing_outside_the_working_directory_fails(tmp_path: Path, write: str):
    target = tmp_path / "outside.txt"
    result = run_program(f"TARGET = {str(target)!r}\n{write}\n", FAST)
    assert not result.passed and "PermissionError" in result.stderr
    assert not target.exists()


def test_files_inside_the_working_directory_work_and_the_directory_is_deleted():
    program = (
        "import os, tempfile\n"
        "open('scratch.txt', 'w').write('x')\n"
        "os.remove('scratch.txt')\n"
        "with tempfile.NamedTemporaryFile() as f:\n"
        "    f.write(b'y')\n"
        "print(os.getcwd())\n"
    )
    result = run_program(program, FAST)
    assert result.passed, result.stderr
    assert not Path(result.stdout.strip()).exists()


@pytest.mark.parametrize(
    "spawn",
    [
        "import subprocess; subprocess.run(['true'])",
        "import os; os.fork()",
        "import os; os.system('true')",
        "import os; os.execv('/bin/true', ['true'])",
        "import multiprocessing",
    ],
    ids=["subprocess", "fork", "system", "execv", "multiprocessing"],
)
def test_spawning_processes_fails(spawn: str):
    result = run_program(spawn + "\n", FAST)
    assert result.status == ERROR
    assert "PermissionError: sandbox:" in result.stderr or "multiprocessing halted" in result.stderr


@pytest.mark.parametrize(
    "namespace",
    [
        pytest.param(True, id="namespace"),
        pytest.param(False, id="guard-only"),
    ],
)
@pytest.mark.parametrize(
    "connect",
    [
        "import socket; socket.create_connection(('127.0.0.1', PORT), timeout=1)",
        "import socket; s = socket.socket(); s.settimeout(1); s.connect(('127.0.0.1', PORT))",
        "import _socket; s = _socket.socket(); s.settimeout(1); s.connect(('127.0.0.1', PORT))",
    ],
    ids=["create_connection", "socket", "_socket"],
)
def test_connecting_to_a_local_listener_fails(namespace: bool, connect: str):
    if namespace and not network_namespace_available():
        pytest.skip("unprivileged network namespaces (unshare -rn) are not available here")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        config = SandboxConfig(timeout=5.0, memory_mb=256, network_namespace=namespace)
        result = run_program(f"PORT = {port}\n{connect}\n", config)
        assert result.status == ERROR and "PermissionError: sandbox: socket" in result.stderr  # the guard fires first
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever connected


def test_parent_environment_is_invisible(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SPARSEPO_FAKE_SECRET", "hunter2-not-a-real-secret")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    result = run_program("import os\nassert os.environ['SPARSEPO_FAKE_SECRET'] == 'hunter2-not-a-real-secret'\n", FAST)
    assert not result.passed and "KeyError" in result.stderr
    listing = run_program("import os\nprint(sorted(os.environ.items()))\n", FAST)
    assert listing.passed and "hunter2" not in listing.stdout and "PROXY" not in listing.stdout
    parent = run_program("import os\nprint(open(f'/proc/{os.getppid()}/environ').read())\n", FAST)
    assert not parent.passed and "hunter2" not in parent.stdout and "/proc entries is disabled" in parent.stderr


@pytest.mark.parametrize("leave", ["exit(0)", "import sys; sys.exit(0)", "import os; os._exit(0)", "quit()"])
def test_leaving_before_the_tests_finish_does_not_pass(leave: str):
    result = run_program(f"{leave}\nassert False\n", FAST)
    assert not result.passed and result.status == ERROR


def test_printing_something_like_a_marker_does_not_pass():
    result = run_program("print('0123456789abcdef passed')\nraise ValueError\n", FAST)
    assert result.status == ERROR and "0123456789abcdef passed" in result.stdout


def test_output_is_truncated():
    result = run_program("print('x' * 10000)\n", SandboxConfig(timeout=5.0, output_chars=100))
    assert result.passed and len(result.stdout) == 100


def test_run_programs_keeps_input_order():
    programs = [GOOD, "assert False\n", GOOD, "raise RuntimeError\n"]
    results = run_programs(programs, FAST, workers=2, progress=False)
    assert [r.status for r in results] == [PASSED, FAILED, PASSED, ERROR]


def test_config_errors_name_the_option():
    with pytest.raises(ValueError, match="timeout"):
        SandboxConfig(timeout=0)
    with pytest.raises(ValueError, match="workers"):
        run_programs([GOOD], FAST, workers=-1)


def test_required_namespace_without_unshare_raises(monkeypatch: pytest.MonkeyPatch):
    from sparsepo_lightning import sandbox

    monkeypatch.setattr(sandbox, "network_namespace_available", lambda python=None: False)
    with pytest.raises(RuntimeError, match="network_namespace"):
        run_program(GOOD, SandboxConfig(network_namespace=True, boundary=False))
    assert run_program(GOOD, SandboxConfig(network_namespace=None, boundary=False)).passed  # falls back to the guard


def test_child_does_not_see_the_parent_working_directory_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``-I``: the caller's directory is not on the child's path (a stray ``socket.py`` cannot shadow stdlib)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil_module.py").write_text("X = 1\n")
    result = run_program("import evil_module\n", FAST)
    assert result.status == ERROR and "ModuleNotFoundError" in result.stderr
    assert os.getcwd() == str(tmp_path)


def test_the_namespace_still_blocks_a_program_that_bypasses_the_guard():
    """The guard patches Python-level methods only; the C type's own ``connect`` slips past it, not past netns."""
    if not network_namespace_available():
        pytest.skip("unprivileged network namespaces (unshare -rn) are not available here")
    bypass = "import socket\ns = socket.socket()\ns.settimeout(1)\ntype(s).__mro__[1].connect(s, ('127.0.0.1', PORT))\n"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        config = SandboxConfig(timeout=5.0, memory_mb=256, network_namespace=True, boundary=False)  # unshare -rn
        result = run_program(f"PORT = {listener.getsockname()[1]}\n{bypass}", config)
        assert result.status == ERROR and "unreachable" in result.stderr
        with pytest.raises(BlockingIOError):
            listener.accept()
