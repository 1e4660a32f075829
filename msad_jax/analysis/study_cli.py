"""Command line of the conditioning study.

``python -m msad_jax.analysis.conditioning --config configs/conditioning_smoke.py --workdir DIR``

Config values are overridden on the command line (``--config.learning_rate=1e-3``). Bad input (an
unknown key, a missing config file, missing data or weights offline) ends with a one-line message
and exit status 1. The flags live on their own ``FlagValues``, so importing this module defines
nothing globally (it can share a process with :mod:`msad_jax.main`).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from absl import flags
from ml_collections import config_flags


def _config_path(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1].split(":", 1)[0]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":", 1)[0]
    return None


def _define_flags() -> tuple[flags.FlagValues, flags.FlagHolder, flags.FlagHolder]:
    """The command's flags, on their own ``FlagValues``: (values, config, workdir)."""
    values = flags.FlagValues()
    config = config_flags.DEFINE_config_file(
        "config", None, "Study config file (configs/conditioning*.py).", flag_values=values
    )
    workdir = flags.DEFINE_string("workdir", None, "Output folder.", flag_values=values)
    return values, config, workdir


def usage() -> str:
    """What ``--help`` prints: this module's description and the flags."""
    values, _, _ = _define_flags()
    return f"{__doc__.strip()}\n\nflags:\n{values.get_help()}\n"


def _parse(argv: Sequence[str]) -> tuple[object, str]:
    """Parses ``argv``; returns (config, workdir) or raises ValueError/FileNotFoundError."""
    from msad_jax.analysis.study_config import check_study_keys

    values, config, workdir = _define_flags()
    overrides = [a[len("--config.") :].split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    check_study_keys(key.split(".")[0] for key in overrides)
    path = _config_path(argv)
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(
            f"Config file {path} not found; pass --config configs/conditioning_smoke.py or "
            "another configs/conditioning*.py file."
            if path
            else "--config is required, e.g. --config configs/conditioning_smoke.py."
        )
    rest = values(list(argv))
    if len(rest) > 1:
        raise ValueError(f"Unexpected arguments: {' '.join(rest[1:])}")
    if not workdir.value:
        raise ValueError("--workdir is required (the output folder).")
    return config.value, workdir.value


def run_cli(argv: Sequence[str] | None = None) -> None:
    """Parses the command line and runs :func:`msad_jax.analysis.study.run_study`."""
    argv = list(sys.argv if argv is None else argv)
    from msad_jax import console

    if console.wants_help(argv):
        print(usage())
        raise SystemExit(0)
    try:
        config, workdir = _parse(argv)
    except Exception as err:  # noqa: BLE001 -- every parsing failure is a usage error here.
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(1) from None
    from msad_jax.analysis.study import run_study
    from msad_jax.errors import user_errors

    console.log_to_console(level=logging.INFO)  # lines via tqdm.write: clear of the bars
    with user_errors():
        results = run_study(config, workdir)
    ends = {loss: f"{100 * records[-1]['auroc']:.2f}%" for loss, records in results["runs"].items()}
    print(f"done: final ROC-AUC {ends} -- results in {workdir}", file=sys.stderr)
