"""User errors: bad configuration, options, data, checkpoints or paths.

Each is raised with one message that says what is wrong, where (file, line, option) and the fix. The ``sparsepo``
command prints such a message without a traceback and exits with status 2; ``--debug`` (or
``SPARSEPO_DEBUG=1``) shows the traceback. Every other exception is an internal error and keeps its traceback.
Each class also derives from the built-in exception a caller would expect (``ValueError``,
``FileNotFoundError``, ``FileExistsError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """Base class: the user can fix this; the message says how."""


class ConfigError(UserError, ValueError):
    """An option or a combination of options is invalid (names the option and the fix)."""


class DataError(UserError, ValueError):
    """A data source holds no usable preference pair (names the file, the reasons and the fix)."""


class MissingFileError(UserError, FileNotFoundError):
    """A data file, checkpoint or export folder that the options name does not exist."""


class OutputExistsError(UserError, FileExistsError):
    """An output folder already holds files that would be overwritten."""
