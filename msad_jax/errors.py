"""User-facing errors: which exceptions mean "fix your input", and how they are shown.

A :class:`UserError` is printed by the command-line tools as one line (exit status 1); anything
else keeps its traceback. ``MSAD_JAX_DEBUG=1`` shows user errors' tracebacks too. Imports nothing
of msad_jax, so every layer can raise these.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

DEBUG_ENV = "MSAD_JAX_DEBUG"


class UserError(Exception):
    """An error the user can fix; its message says what is wrong and what to do."""


class InputError(UserError, ValueError):
    """A file, folder, setting or argument the user gave cannot be used as it is."""


class MissingInputError(UserError, FileNotFoundError):
    """A file, folder or dataset the run needs is not there."""


class MissingDependencyError(UserError, ImportError):
    """An optional package is needed for what was asked."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint or detector file cannot be used for this run; the message says what to do."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint's files are unreadable, differ from what was saved, or hold NaN/inf.

    Attributes:
      step: the checkpoint's step.
      folder: the checkpoint's folder.
    """

    def __init__(self, message: str, *, step: int, folder: str):
        super().__init__(message)
        self.step = step
        self.folder = folder


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (its type name when it has none)."""
    return " ".join(str(err).split()) or type(err).__name__


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turns a :class:`UserError` into one line on stderr and exit status 1."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        yield
        return
    try:
        yield
    except UserError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(1) from None
