"""The ``sparsepo`` console script (also ``python -m sparsepo_lightning``).

``sparsepo --help`` (or ``-h``) is answered from :mod:`sparsepo_lightning.commands` and the commands with parsers
of their own (``evaluate``, ``export``, ``study``, their ``--help`` included) run from
:mod:`sparsepo_lightning.dispatch`, with no import of torch or Lightning before a command runs (importing them takes
several seconds); ``fit``, ``validate`` and ``test`` go to LightningCLI (:func:`sparsepo_lightning.cli.run`).
"""

from __future__ import annotations

import sys

from sparsepo_lightning import dispatch


def main() -> None:
    """Entry point of the ``sparsepo`` console script."""
    if sys.argv[1:] in (["--help"], ["-h"]):
        from sparsepo_lightning.commands import top_level_parser

        top_level_parser().print_help()
        return
    dispatch.main(_lightning)


def _lightning() -> None:
    """LightningCLI on the command line (imports torch and Lightning)."""
    from sparsepo_lightning.cli import run

    run()


if __name__ == "__main__":
    main()
