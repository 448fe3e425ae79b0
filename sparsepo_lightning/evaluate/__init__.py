"""``sparsepo evaluate <command>``: evaluate trained policies; each command writes JSON, CSV, a PNG and TensorBoard.

Commands (one module each): ``sentiment`` (reward and KL, reward-KL frontier), ``summarization`` (ROUGE and
self-BLEU over a temperature sweep), ``code`` (pass@k on HumanEval / MBPP through the sandbox) and ``winrate``
(policy vs reference or another checkpoint, judged by a scorer). Run ``sparsepo evaluate <command> --help``.

The command modules import, at their top, only what their parsers need (no torch, transformers or Lightning), so
the help prints in a fraction of a second; what loads and samples models is imported when a command runs.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import Any

from sparsepo_lightning.commands import PlainRawFormatter
from sparsepo_lightning.evaluate import code, sentiment, summarization, winrate

COMMANDS = {"sentiment": sentiment, "summarization": summarization, "code": code, "winrate": winrate}
"""Command name -> module with ``HELP``, ``add_arguments(parser)`` and ``run(args) -> dict``."""


class _Formatter(PlainRawFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the module docstrings' layout (without reST markup) and shows defaults."""


def parser() -> argparse.ArgumentParser:
    """The ``sparsepo evaluate`` parser with one subcommand per entry of `COMMANDS`."""
    p = argparse.ArgumentParser(prog="sparsepo evaluate", description=__doc__.splitlines()[0],
                                formatter_class=_Formatter)  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, module in COMMANDS.items():
        command = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                                 formatter_class=_Formatter)  # fmt: skip
        module.add_arguments(command)
        command.set_defaults(func=module.run)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` (default: the command line after ``evaluate``), run the command, return its summary."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)
