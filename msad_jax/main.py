"""Command line: ``python -m msad_jax.main --config configs/cifar10.py --workdir DIR``.

Config values are overridden on the command line, e.g. ``--config.normal_class=3`` or
``--config.normal_class=all``. A run started again with the same ``--workdir`` resumes.
Misconfiguration (unknown key or dataset, missing weights or data offline, a damaged or foreign
checkpoint, a workdir in use) ends with a one-line message and exit status 1, without a traceback
(``MSAD_JAX_DEBUG=1`` shows it); any other error keeps its traceback.

Multi-host: start the same command on every host (one process per host) with
``--coordinator_address=HOST0:PORT --num_processes=N --process_id=I`` (or the environment
variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), or with
``--distributed_auto`` under SLURM / Open MPI / Cloud TPU; ``--workdir`` must be a folder all
hosts share. See :mod:`msad_jax.distributed`.

On a CPU the models train with msad_jax's CPU lowering (:mod:`msad_jax.models.cpu_lowering`) and
XLA's Eigen convolutions (:mod:`msad_jax.cpu_flags`); ``--nocpu_lowering`` (or
``MSAD_JAX_CPU_LOWERING=0``) turns both off.
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
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "Multi-host: host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS).",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Multi-host: number of processes (default: $JAX_NUM_PROCESSES)."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "Multi-host: this process's number, 0..N-1 (default: $JAX_PROCESS_ID)."
)
_DISTRIBUTED_AUTO = flags.DEFINE_bool(
    "distributed_auto",
    False,
    "Multi-host: let JAX detect the cluster (SLURM, Open MPI, Cloud TPU) when nothing is set.",
)
_CPU_LOWERING = flags.DEFINE_bool(
    "cpu_lowering",
    True,
    "On a CPU, train with msad_jax's lowering of depthwise/1x1 convolutions and max-pooling and "
    "with XLA's Eigen convolutions (several times faster, same results up to float rounding); "
    "--nocpu_lowering uses XLA's defaults. Same as MSAD_JAX_CPU_LOWERING=0. See "
    "benchmarks/RESULTS.md.",
)
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
    """Parses flags; a bad override or config file ends with one line and exit status 1.

    ``--help`` prints the usage and exits with status 0.
    """
    from msad_jax import console
    from msad_jax.config import check_keys

    if console.wants_help(argv):
        return console.parse_absl_flags(argv)
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
    from msad_jax import console, cpu_flags, distributed
    from msad_jax.errors import user_errors

    if not _CPU_LOWERING.value:
        cpu_flags.switch_off()  # before anything starts JAX's CPU backend
    with user_errors():
        # Before anything touches a device: join the other processes of a multi-host run.
        distributed.initialize(
            _COORDINATOR.value,
            _NUM_PROCESSES.value,
            _PROCESS_ID.value,
            auto=_DISTRIBUTED_AUTO.value,
        )
    from msad_jax.train import train_and_evaluate

    logging.set_verbosity(logging.WARNING)  # quiet libraries (orbax logs every save at INFO)
    main_process = distributed.is_main_process()
    # The library's lines go through tqdm.write: they never land on the progress bar.
    console.log_to_console(level=std_logging.INFO if main_process else std_logging.WARNING)
    with user_errors():
        result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    if not main_process:
        return
    final = result.get("mean_auroc", result.get("final", {}).get("auroc"))
    print(f"done: ROC-AUC {100 * final:.2f}% -- report in {_WORKDIR.value}", file=sys.stderr)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
