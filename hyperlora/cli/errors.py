"""The error a command raises for bad command-line input; `hyperlora.cli.main` turns it into one line, exit 2."""
from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(ValueError):
    """Bad input from the command line: a flag value, a config / ``--set`` override, a policy text.

    ``hyperlora.cli.main`` prints ``hyperlora COMMAND: <message>`` on one line and exits with status 2
    (as it does for ``TaskFormatError`` and a missing input file), with no traceback.
    """
