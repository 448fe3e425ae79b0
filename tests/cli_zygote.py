"""Run ``sparsepo`` commands as separate processes without paying the interpreter's start-up each time.

Importing the CLI (torch, Lightning, transformers, jsonargparse) takes ~8 s of CPU, which is most of what a test
that runs ``python -m sparsepo_lightning.cli ...`` as a subprocess spends. :class:`CliZygote` starts this file once
as a subprocess that imports the CLI and then waits for commands on its stdin; each command runs in a process
forked from it (its own pid, environment, working folder, stdout/stderr files and exit status, exactly as
``python -m sparsepo_lightning.cli`` would have them: ``SystemExit`` becomes the exit status, an uncaught exception
prints its traceback and exits with 1; unlike a real exit, ``atexit`` handlers do not run). Forking is safe here
because the waiting process has only imported modules: no torch thread pool has started. One real ``python -m``
start stays in the tests (``--help``) to hold the entry point itself.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRELOAD = ("sparsepo_lightning.cli", "sparsepo_lightning.evaluate", "sparsepo_lightning.export",
           "sparsepo_lightning.study.__main__", "transformers.models.llama.modeling_llama",
           # what the evaluate commands import once they run (their parsers import no model code)
           "sparsepo_lightning.evaluate.policies", "sparsepo_lightning.evaluate.sampling",
           "sparsepo_lightning.builders.scorers")


def _child(request: dict) -> None:
    """In the forked process: become ``python -m sparsepo_lightning.cli *args`` and exit (never returns)."""
    code = 1
    try:
        signal.alarm(request["timeout"])  # SIGALRM ends a command that hangs
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for entry in reversed(os.environ.get("PYTHONPATH", "").split(os.pathsep)):  # as a new interpreter would
            if entry and os.path.abspath(entry) not in sys.path:
                sys.path.insert(1, os.path.abspath(entry))
        if os.environ.get("OMP_NUM_THREADS"):  # read by torch at start-up, which this process is past
            import torch

            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        if request["stdout"] == request["stderr"]:  # one file for both, as `2>&1`
            os.dup2(os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_APPEND), 1)
            os.dup2(1, 2)
        else:
            for fd, name in ((1, "stdout"), (2, "stderr")):
                os.dup2(os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        if "code" in request:  # as `python -c CODE`: argv ['-c'], the working folder first on sys.path
            sys.argv, sys.path[0] = ["-c"], ""
            namespace = {"__name__": "__main__", "__builtins__": __builtins__}

            def main() -> None:
                exec(compile(request["code"], "<string>", "exec"), namespace)
        else:
            sys.argv = [str(ROOT / "sparsepo_lightning" / "cli.py"), *request["args"]]
            # as under `python -m`: Lightning starts the other ranks of a DDP/FSDP run as `python -m <this spec>`
            sys.modules["__main__"].__spec__ = importlib.util.find_spec("sparsepo_lightning.cli")
            from sparsepo_lightning.cli import main

        try:
            main()
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
            if not isinstance(done.code, int | None):
                sys.stderr.write(f"{done.code}\n")
        except BaseException:  # what the interpreter does with an uncaught exception
            traceback.print_exc()
            code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    """The waiting process: one JSON request per stdin line, one JSON answer line per request.

    ``{"op": "start", ...}`` forks a command and answers its pid; ``{"op": "poll", "pid": p}`` answers its exit
    status or null while it runs; ``{"op": "wait", "pid": p}`` waits for it and answers its exit status."""
    for module in PRELOAD:
        importlib.import_module(module)
    print(json.dumps({"ready": True}), flush=True)
    ended: dict[int, int] = {}
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "start":
            pid = os.fork()
            if pid == 0:
                _child(request)
            answer = {"pid": pid}
        else:
            pid = request["pid"]
            if pid not in ended:
                done, status = os.waitpid(pid, os.WNOHANG if request["op"] == "poll" else 0)
                if done:
                    ended[pid] = os.waitstatus_to_exitcode(status)
            answer = {"returncode": ended.get(pid)}
        print(json.dumps(answer), flush=True)


class ForkedCommand:
    """A command running in a process forked from the zygote: the part of :class:`subprocess.Popen` tests use."""

    def __init__(self, zygote: CliZygote, pid: int, args: list[str], stdout: Path, stderr: Path) -> None:
        self.zygote, self.pid, self.args, self._stdout, self._stderr = zygote, pid, args, stdout, stderr
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.zygote.ask({"op": "poll", "pid": self.pid})["returncode"]
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = self.zygote.ask({"op": "wait", "pid": self.pid})["returncode"]
        return self.returncode

    def send_signal(self, signal_number: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal_number)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    @property
    def stdout(self) -> str:
        return self._stdout.read_text()

    @property
    def stderr(self) -> str:
        return self._stderr.read_text()

    def result(self) -> subprocess.CompletedProcess:
        """Wait for the end; the command's exit status and outputs."""
        return subprocess.CompletedProcess(["sparsepo", *self.args], self.wait(), self.stdout, self.stderr)


class CliZygote:
    """``run(*args)`` -> :class:`subprocess.CompletedProcess` like ``subprocess.run([python, -m, cli, *args])``;
    ``start(*args)`` -> :class:`ForkedCommand` like ``subprocess.Popen``. Commands end after ``timeout`` seconds
    (SIGALRM) at the latest."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = dict(env)
        self.folder = Path(tempfile.mkdtemp(prefix="cli-zygote-"))
        self.process = subprocess.Popen([sys.executable, __file__], cwd=ROOT, env=self.env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        if not self.process.stdout.readline():
            raise RuntimeError("the CLI zygote did not start (see the test's captured stderr)")
        self.count = 0

    def ask(self, request: dict) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            raise RuntimeError("the CLI zygote died")
        return json.loads(answer)

    def start(self, *args: str, env: dict[str, str] | None = None, timeout: int = 300,
              output: Path | None = None) -> ForkedCommand:
        """Fork ``sparsepo *args``; its stdout and stderr go to files of the zygote, or both to ``output``."""
        return self._fork({"args": list(args)}, list(args), env, timeout, output)

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
        return self.start(*args, env=env, timeout=timeout).result()

    def python(self, code: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
        """``python -c code`` in the repository root, forked like a command (its modules are already imported)."""
        return self._fork({"code": code}, ["-c", code], env, timeout, None).result()

    def _fork(self, what: dict, args: list[str], env: dict[str, str] | None, timeout: int,
              output: Path | None) -> ForkedCommand:
        self.count += 1
        out, err = self.folder / f"{self.count}.out", self.folder / f"{self.count}.err"
        if output is not None:
            out = err = Path(output)
        pid = self.ask({"op": "start", **what, "cwd": str(ROOT), "env": {**self.env, **(env or {})},
                        "stdout": str(out), "stderr": str(err), "timeout": timeout})["pid"]
        return ForkedCommand(self, pid, args, out, err)

    def subprocess_run(self, command: list[str], stdout=None, stderr=None, check: bool = False, **kwargs):
        """Stands in for :func:`subprocess.run` in code that runs ``[python, -m, sparsepo_lightning.cli, ...]`` with
        its output to an open file (``stderr=subprocess.STDOUT``): the command is forked from the zygote."""
        prefix = [sys.executable, "-m", "sparsepo_lightning.cli"]
        if command[:3] != prefix or stderr is not subprocess.STDOUT or not hasattr(stdout, "name") or kwargs:
            raise AssertionError(f"not a sparsepo command with its output to one file: {command}")
        stdout.flush()
        done = self.start(*command[3:], output=Path(stdout.name), timeout=600).wait()
        if check and done != 0:
            raise subprocess.CalledProcessError(done, command)
        return subprocess.CompletedProcess(command, done)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)
        shutil.rmtree(self.folder, ignore_errors=True)


def cli_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without the debug switches, with the repository importable."""
    environment = {k: v for k, v in os.environ.items() if k not in ("SPARSEPO_DEBUG", "JSONARGPARSE_DEBUG")}
    environment.update(PYTHONPATH=str(ROOT), **(env or {}))
    return environment


if __name__ == "__main__":
    serve()
