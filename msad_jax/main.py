"""Command line: ``python -m msad_jax.main --config configs/cifar10.py --workdir DIR``.

Config values are overridden on the command line, e.g. ``--config.normal_class=3`` or
``--config.normal_class=all``. A run started again with the same ``--workdir`` resumes.
Misconfiguration (unknown key or dataset, missing weights or data offline, corrupt checkpoint)
ends with a one-line message and exit status 1, without a traceback.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder; an existing run there resumes.")
flags.mark_flags_as_required(["config", "workdir"])


def _check_config_file(argv: list[str]) -> None:
    """A missing config file is named plainly (ml_collections would defer a long error)."""
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        else:
            continue
        path = path.split(":", 1)[0]
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Config file {path} not found; pass one of the files in configs/, e.g. "
                "--config configs/cifar10.py."
            )


def parse_flags(argv: list[str]) -> list[str]:
    """Parses flags; a bad override or config file ends with one line and exit status 1."""
    from msad_jax.config import check_keys

    overrides = [a[len("--config.") :].split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    try:
        check_keys(key.split(".")[0] for key in overrides)
        _check_config_file(argv)
        return flags.FLAGS(argv)
    except Exception as err:  # noqa: BLE001 -- every parsing failure is a usage error here.
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(1) from None


def main(argv: list[str]) -> None:
    """Runs :func:`msad_jax.train.train_and_evaluate` with the parsed config."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    from msad_jax.errors import user_errors
    from msad_jax.train import train_and_evaluate

    logging.set_verbosity(logging.WARNING)  # quiet libraries (orbax logs every save at INFO)
    std_logging.getLogger("msad_jax").setLevel(std_logging.INFO)
    with user_errors():
        result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    final = result.get("mean_auroc", result.get("final", {}).get("auroc"))
    print(f"done: ROC-AUC {100 * final:.2f}% -- report in {_WORKDIR.value}", file=sys.stderr)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
