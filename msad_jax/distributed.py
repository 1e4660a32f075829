"""Multi-host start-up and cross-process helpers (one process per host, ``jax.distributed``)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np

from msad_jax.errors import InputError

COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise InputError(f"environment variable {name}={value!r} must be an integer") from None


def resolve_settings(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> tuple[str | None, int | None, int | None]:
    """Fills unset arguments from the environment (``JAX_COORDINATOR_ADDRESS`` and the like).

    The variables are ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``.

    Returns:
      ``(coordinator_address, num_processes, process_id)``, each None when given nowhere.

    Raises:
      ValueError: for values that cannot be right (non-integers, ``process_id`` outside ``[0,
        num_processes)``, a coordinator address without a port).
    """
    coordinator_address = coordinator_address or os.environ.get(COORDINATOR_ENV) or None
    if num_processes is None:
        num_processes = _env_int(NUM_PROCESSES_ENV)
    if process_id is None:
        process_id = _env_int(PROCESS_ID_ENV)
    if coordinator_address is not None and ":" not in coordinator_address:
        raise InputError(
            f"coordinator address {coordinator_address!r} needs a port: pass host:port of "
            "process 0, e.g. 10.0.0.1:12345"
        )
    if num_processes is not None and num_processes < 1:
        raise InputError(f"num_processes={num_processes} must be >= 1")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise InputError(
            f"process_id={process_id} must lie in [0, num_processes={num_processes}); number the "
            "processes 0, 1, ..., num_processes - 1"
        )
    return coordinator_address, num_processes, process_id


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
    local_device_ids: Sequence[int] | None = None,
    timeout_s: int = 300,
) -> bool:
    """Starts ``jax.distributed`` when this is one process of a multi-process run.

    Args:
      coordinator_address: ``host:port`` of process 0 (its coordinator service listens there).
      num_processes: number of processes (hosts).
      process_id: this process's number, ``0 .. num_processes - 1``.
      auto: with nothing set, let JAX detect the cluster (SLURM, Open MPI, Cloud TPU).
      local_device_ids: restrict this process to these local devices (default: all).
      timeout_s: how long to wait for the other processes to connect.

    Returns:
      True if ``jax.distributed`` was initialised (now or before), False for a plain
      single-process run.

    Raises:
      ValueError: for partial or inconsistent settings (the message names what is missing).
    """
    if jax.distributed.is_initialized():
        return True
    coordinator_address, num_processes, process_id = resolve_settings(
        coordinator_address, num_processes, process_id
    )
    given = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    if all(v is None for v in given.values()) and not auto:
        return False
    if num_processes == 1 and coordinator_address is None and not auto:
        return False
    missing = [k for k, v in given.items() if v is None]
    if missing and not auto:
        raise InputError(
            f"multi-process settings incomplete: {', '.join(missing)} not given; pass "
            "--coordinator_address, --num_processes and --process_id (or set "
            f"{COORDINATOR_ENV}, {NUM_PROCESSES_ENV}, {PROCESS_ID_ENV}), or --distributed_auto "
            "on SLURM / Open MPI / Cloud TPU"
        )
    if _platforms_include_cpu():
        # Cross-process collectives of the CPU backend (gloo is the default in jax 0.10; set it
        # explicitly so an older default of "none" cannot leave collectives unimplemented).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=timeout_s,
    )
    return True


def _platforms_include_cpu() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
    return not platforms or "cpu" in platforms.split(",")


def is_main_process() -> bool:
    """True on process 0, the one that writes reports, plots and logs."""
    return jax.process_index() == 0


def interleave_rows(gathered: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Puts per-process batch slices back into input order and drops padding.

    Args:
      gathered: ``[P, n_batches, rows, ...]``: for every process ``p`` (in process order) its
        ``rows`` rows of each of the ``n_batches`` global batches.
      mask: ``[P, n_batches, rows]`` bool, False for padding.

    Returns:
      ``[n_valid, ...]``: batch by batch, process by process, row by row (the order in which
      :func:`msad_jax.data.pipeline.eval_batches` cut the input), valid rows only.
    """
    gathered = np.asarray(gathered)
    mask = np.asarray(mask, dtype=bool)
    if gathered.shape[:3] != mask.shape:
        raise ValueError(
            f"gathered rows {gathered.shape} and mask {mask.shape} disagree on "
            "[processes, batches, rows]"
        )
    order = np.swapaxes(gathered, 0, 1).reshape(-1, *gathered.shape[3:])
    return order[np.swapaxes(mask, 0, 1).reshape(-1)]


def gather_rows(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The valid rows of all processes' batches, in global input order.

    Args:
      values: ``[n_batches, rows, ...]`` this process's rows of each global batch (same shape on
        every process).
      mask: ``[n_batches, rows]`` bool, False for padding.

    Returns:
      ``[n_valid_total, ...]`` as :func:`interleave_rows`.
    """
    values = np.asarray(values)
    mask = np.asarray(mask, dtype=bool)
    if jax.process_count() == 1:
        return interleave_rows(values[None], mask[None])
    from jax.experimental import multihost_utils

    gathered_values = np.asarray(multihost_utils.process_allgather(values, tiled=False))
    gathered_mask = np.asarray(multihost_utils.process_allgather(mask, tiled=False))
    return interleave_rows(gathered_values, gathered_mask)
