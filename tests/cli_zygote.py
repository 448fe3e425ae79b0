"""Run ``sparsepo`` commands as separate processes without paying the interpreter's start-up each time.

Importing the CLI (torch, Lightning, transformers, jsonargparse) takes ~8 s of CPU, which is most of what a test
that runs ``python -m sparsepo_lightning.cli ...`` as a subprocess spends. :class:`CliZygote` starts this file once
as a subprocess that imports the CLI and then waits for commands on its stdin; each command runs in a process
forked from it (its own pid, environment, working folder, stdout/stderr files and exit status, exactly as
``python -m sparsepo_lightning.cli`` would have them: ``SystemExit`` becomes the exit status, an uncaught exception
prints its traceback and exits with 1). Forking is safe here because the waiting process has only imported
modules: no torch thread pool has started. One real ``python -m`` start stays in the tests (``--help``) to hold
the entry point itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRELOAD = ("sparsepo_lightning.cli", "sparsepo_lightning.evaluate", "sparsepo_lightning.export",
           "sparsepo_lightning.study.__main__", "transformers.models.llama.modeling_llama")


def _child(request: dict) -> None:
    """In the forked process: become ``python -m sparsepo_lightning.cli *args`` and exit (never returns)."""
    code = 1
    try:
        signal.alarm(request["timeout"])  # SIGALRM ends a command that hangs
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, name in ((1, "stdout"), (2, "stderr")):
            os.dup2(os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv = [str(ROOT / "sparsepo_lightning" / "cli.py"), *request["args"]]
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
    """The waiting process: one JSON request per stdin line, one ``{"returncode": n}`` line back per request."""
    import importlib

    for module in PRELOAD:
        importlib.import_module(module)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


class CliZygote:
    """``run(*args)`` -> :class:`subprocess.CompletedProcess`, like ``subprocess.run(python -m cli ...)``."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = dict(env)
        self.folder = Path(tempfile.mkdtemp(prefix="cli-zygote-"))
        self.process = subprocess.Popen([sys.executable, __file__], cwd=ROOT, env=self.env, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        ready = self.process.stdout.readline()
        if not ready:
            raise RuntimeError("the CLI zygote did not start (see the test's captured stderr)")
        self.count = 0

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
        self.count += 1
        out, err = self.folder / f"{self.count}.out", self.folder / f"{self.count}.err"
        request = {"args": list(args), "cwd": str(ROOT), "env": {**self.env, **(env or {})},
                   "stdout": str(out), "stderr": str(err), "timeout": timeout}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            raise RuntimeError("the CLI zygote died")
        returncode = json.loads(answer)["returncode"]
        return subprocess.CompletedProcess(["sparsepo", *args], returncode, out.read_text(), err.read_text())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


if __name__ == "__main__":
    serve()
