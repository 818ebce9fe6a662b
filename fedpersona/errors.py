"""Errors that reach the user as one clear line and exit code 2 (bad input or usage)."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input or usage: the CLI prints ``str(error)`` on one line and exits with code 2.

    The message names what is wrong, where (file, line, option) and how to fix it.
    """


class RunFailed(Exception):
    """A run that could not do its work (e.g. every client call failed): the CLI prints ``str(error)`` on
    one line and exits with code 1; the outputs written so far stay for inspection."""
