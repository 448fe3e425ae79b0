"""The ``sparsepo`` command line up to LightningCLI, with the standard library alone: ``--debug``, the commands with
parsers of their own (``evaluate``, ``export``, ``study``) and user errors as one message.

The commands' parsers are built without torch, transformers or Lightning (what runs models is imported once a
command runs), so ``sparsepo evaluate --help``, ``sparsepo evaluate <command> --help`` and ``sparsepo export --help``
print in a fraction of a second: the console script (``sparsepo_lightning.__main__``) comes here without importing
:mod:`sparsepo_lightning.cli`, which is imported only for ``fit``, ``validate`` and ``test``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from sparsepo_lightning.commands import OTHER_COMMANDS, SUBCOMMAND_HELP
from sparsepo_lightning.cpu_memory import keep_freed_memory
from sparsepo_lightning.errors import UserError


def main(lightning: Callable[[], object]) -> None:
    """Run the command line in ``sys.argv``: ``evaluate``, ``export`` and ``study`` here, anything else by calling
    ``lightning`` (which runs LightningCLI on ``sys.argv``).

    A :class:`~sparsepo_lightning.errors.UserError` is printed as one message (exit status 2) unless ``--debug`` is on
    the command line or ``SPARSEPO_DEBUG`` is set (then: the traceback).
    """
    debug = "--debug" in sys.argv[1:] or os.environ.get("SPARSEPO_DEBUG", "") not in ("", "0")
    sys.argv[1:] = [a for a in sys.argv[1:] if a != "--debug"]
    if debug:
        os.environ["JSONARGPARSE_DEBUG"] = "true"  # parse errors raise with their traceback too
    command = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] in (*OTHER_COMMANDS, *SUBCOMMAND_HELP) else ""
    try:
        keep_freed_memory()  # before the first large allocation: CPU steps reuse freed memory (cpu_memory.py)
        if command == "evaluate":
            from sparsepo_lightning.evaluate import main as evaluate_main

            evaluate_main(sys.argv[2:])
        elif command == "export":
            from sparsepo_lightning.export import main as export_main

            export_main(sys.argv[2:])
        elif command == "study":
            from sparsepo_lightning.study.__main__ import main as study_main

            sys.exit(study_main(sys.argv[2:]))
        else:
            lightning()
    except Exception as e:
        user_error = user_error_of(e) or _plugin_error(e)
        if debug or user_error is None:
            raise
        sys.stderr.write(f"sparsepo{' ' + command if command else ''}: error: {user_error}\n"
                         "(--debug or SPARSEPO_DEBUG=1 shows the traceback)\n")  # fmt: skip
        sys.exit(2)


def user_error_of(error: BaseException | None) -> UserError | None:
    """The :class:`UserError` behind ``error``: itself, or its cause (jsonargparse wraps what a class's
    ``__init__`` raises in its own "does not validate" error)."""
    for _ in range(20):
        if error is None or isinstance(error, UserError):
            return error
        error = error.__cause__ or error.__context__
    return None


def _plugin_error(error: BaseException) -> str | None:
    """A configured class's own argument check, explained (:func:`sparsepo_lightning.cli_support.plugin_error`).

    Imported here, on an error that is no :class:`UserError`, since ``cli_support`` imports Lightning.
    """
    from sparsepo_lightning.cli_support import plugin_error

    return plugin_error(error)
