"""Exceptions shared by the Python layer."""

from __future__ import annotations


class UsageError(ValueError):
    """A bad argument from the user: a path, a size, an option that does not fit.

    Library callers can catch it as a ValueError; the command line prints its message
    as ``tokcore <command>: error: ...`` and exits with status 2, without a traceback."""


class InputNotFoundError(UsageError, FileNotFoundError):
    """A file or folder that the user named does not exist."""


class OutputWriteError(OSError):
    """A file that tokcore had to write could not be written (a full disk, a folder
    without write permission). The command line prints its message as
    ``tokcore <command>: error: ...`` and exits with status 1, without a traceback."""


class NonFiniteLogitsError(ValueError):
    """A model's next-byte logits hold NaN or inf (or are all -inf): there is no
    distribution to draw from, typically because the weights diverged. The command line
    prints its message and exits with status 1."""
