"""User-facing errors: which exceptions mean "fix your input", and how they are shown.

Set ``MSAD_JAX_DEBUG=1`` to get the full traceback instead of the one-line message.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from msad_jax.checkpointing import CheckpointError
from msad_jax.config import ConfigError
from msad_jax.models import PretrainedWeightsError, StateDictMismatchError
from msad_jax.models.weight_files import WeightFileError

USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    CheckpointError,
    PretrainedWeightsError,
    StateDictMismatchError,
    WeightFileError,
    FileNotFoundError,
    ValueError,
    RuntimeError,
)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turns the errors of :data:`USER_ERRORS` into one line on stderr and exit status 1."""
    if os.environ.get("MSAD_JAX_DEBUG"):
        yield
        return
    try:
        yield
    except USER_ERRORS as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(1) from None
