"""Errors that reach the user as one clear line and exit code 2 (bad input or usage)."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input or usage: the CLI prints ``str(error)`` on one line and exits with code 2.

    The message names what is wrong, where (file, line, option) and how to fix it.
    """
