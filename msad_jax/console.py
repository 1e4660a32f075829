"""What the commands print: help that exits cleanly, log lines that keep clear of progress bars.

- ``--help`` (and ``-h``, ``--helpshort``, ``--helpfull``, ``--helpxml``) prints the usage and
  exits with status 0; absl's own flag parser exits with 1 after printing it
  (:func:`parse_absl_flags`).
- The library's log lines (``logging.getLogger("msad_jax")``) are written with ``tqdm.write``, which
  clears the progress bars on the same stream, prints the line and redraws the bars, so a line
  never lands in the middle of a bar (:func:`log_to_console`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import TextIO

import tqdm
from absl import flags

HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "--helpfull", "--helpxml")
"""The flags with which absl prints the usage (``app.define_help_flags``)."""

LOG_FORMAT = "%(asctime)s %(message)s"
LOG_DATE_FORMAT = "%H:%M:%S"


def wants_help(argv: Sequence[str]) -> bool:
    """Whether the command line (program name first) asks for the usage."""
    for arg in argv[1:]:
        if arg == "--":
            return False
        if arg in HELP_FLAGS:
            return True
    return False


def parse_absl_flags(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """Parses ``argv`` into ``flag_values``; a help flag prints the usage and exits with 0.

    For ``app.run(main, flags_parser=...)``. A bad flag ends with one ``error: ...`` line on
    stderr and exit status 1.

    Returns:
      The arguments that are not flags (program name first).
    """
    if wants_help(argv):  # absl knows --help and -?, not -h
        argv = [a if a != "-h" else "--help" for a in argv]
    try:
        return flag_values(list(argv))
    except SystemExit:
        if wants_help(argv):
            raise SystemExit(0) from None
        raise
    except flags.Error as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(1) from None


class TqdmSafeHandler(logging.StreamHandler):
    """A stream handler that writes through ``tqdm.write``: lines never glue onto a bar."""

    def emit(self, record: logging.LogRecord) -> None:
        """Writes the formatted record above any progress bar on the stream."""
        try:
            tqdm.tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # noqa: BLE001 -- logging's own convention for failed output.
            self.handleError(record)


def log_to_console(
    logger_name: str = "msad_jax",
    level: int = logging.INFO,
    *,
    stream: TextIO | None = None,
    fmt: str = LOG_FORMAT,
    datefmt: str | None = LOG_DATE_FORMAT,
) -> TqdmSafeHandler:
    """Sends the records of ``logger_name`` (and its children) to ``stream`` via ``tqdm.write``.

    The logger stops propagating to the root logger (whose handlers would print every line a
    second time, straight onto the bar). Calling it again replaces the earlier handler.

    Args:
      logger_name: the logger, by default the library's.
      level: the lowest level shown.
      stream: where the lines go (default ``sys.stderr``, where the progress bars are drawn).
      fmt: log record format.
      datefmt: date format of ``%(asctime)s``.

    Returns:
      The installed handler.
    """
    logger = logging.getLogger(logger_name)
    for old in [h for h in logger.handlers if isinstance(h, TqdmSafeHandler)]:
        logger.removeHandler(old)
    handler = TqdmSafeHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(logging.Formatter(fmt, datefmt))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return handler
