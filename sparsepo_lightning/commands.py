"""The ``sparsepo`` commands, their one-line help and the top-level ``sparsepo --help``, with the standard library
alone: the console script (``sparsepo_lightning.__main__``) answers ``sparsepo --help`` from here without importing
torch or Lightning, and :mod:`sparsepo_lightning.cli` builds LightningCLI's listing from the same strings."""

from __future__ import annotations

import argparse
import re

DESCRIPTION = (
    "Preference alignment (SparsePO, DPO, IPO, SimPO, TDPO, MaPO) with PyTorch Lightning. Start with `sparsepo fit "
    "--config configs/quickstart.yaml`; `sparsepo <command> --help` lists a command's options; --debug shows the "
    "traceback of an error."
)

SUBCOMMAND_HELP = {
    "fit": "Train a policy from a config (--config); --ckpt_path last resumes the newest checkpoint of this run.",
    "validate": "Run the validation split once on a model or checkpoint (--ckpt_path).",
    "test": "Run the test split (data.test_file) once on a model or checkpoint (--ckpt_path).",
}
"""The LightningCLI subcommands offered (``predict`` is not: a preference model has no forward to predict with)."""

OTHER_COMMANDS = {
    "evaluate": "Evaluate trained checkpoints: sentiment, summarization, code (pass@k), winrate.",
    "export": "Write a checkpoint's policy as a Hugging Face model folder, plus its masks.",
    "study": "Controlled studies: `sparsepo study sentiment run|report|plan` (resumable).",
}
"""Commands that ``dispatch.main`` runs instead of LightningCLI (listed in ``sparsepo --help`` all the same)."""

SUBCOMMANDS_DESCRIPTION = "For more details of each subcommand, add it as an argument followed by --help."


def plain_text(text: str) -> str:
    """``text`` without reST markup, for help screens: ``:class:`~a.b.C``` → ``C``, double backquotes → single."""
    text = re.sub(r":[a-z]+:`~?(?:[\w.]+\.)?([^`]+)`", r"\1", text)
    return text.replace("``", "`")


class PlainRawFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps a description's (a module docstring's) layout and drops its reST markup."""

    def format_help(self) -> str:
        return plain_text(super().format_help())


def listed_help(name: str) -> str:
    """The one-line help of command ``name`` in the top-level listing."""
    return SUBCOMMAND_HELP.get(name) or f"{OTHER_COMMANDS[name]} (sparsepo {name} --help)"


def top_level_parser() -> argparse.ArgumentParser:
    """The top-level options and the command listing, as ``sparsepo --help`` shows them."""
    parser = argparse.ArgumentParser(prog="sparsepo", description=DESCRIPTION)
    parser.add_argument("-c", "--config", metavar="CONFIG",
                        help="Path to a configuration file in json or yaml format.")  # fmt: skip
    parser.add_argument("--print_config", metavar="=flags", nargs="?",
                        help="Print the configuration after applying all other arguments and exit.")  # fmt: skip
    commands = parser.add_subparsers(title="subcommands", description=SUBCOMMANDS_DESCRIPTION)
    for name in (*SUBCOMMAND_HELP, *OTHER_COMMANDS):
        commands.add_parser(name, help=listed_help(name))
    return parser
