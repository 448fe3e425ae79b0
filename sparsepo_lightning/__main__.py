"""The ``sparsepo`` console script (also ``python -m sparsepo_lightning``).

``sparsepo --help`` (or ``-h``) is answered from :mod:`sparsepo_lightning.commands` with the standard library
alone, in a fraction of a second (importing torch and Lightning takes several); every other command line goes to
:func:`sparsepo_lightning.cli.main`.
"""

from __future__ import annotations

import sys


def main() -> None:
    """Entry point of the ``sparsepo`` console script."""
    if sys.argv[1:] in (["--help"], ["-h"]):
        from sparsepo_lightning.commands import top_level_parser

        top_level_parser().print_help()
        return
    from sparsepo_lightning.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
