"""What a run keeps in its workdir to resume: the checkpointed state and ``run.json``."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from msad_jax import distributed
from msad_jax.checkpointing import CheckpointError, DamagedCheckpointError, RunCheckpoints
from msad_jax.preprocessing import Preprocessing
from msad_jax.run_files import RUN_INFO_FILE, write_atomically
from msad_jax.run_setup import check_identity, saved_identity
from msad_jax.train_step import TrainState

PyTree = Any
logger = logging.getLogger(__name__)
DAMAGED_DIR = "damaged_checkpoints"


def host_tree(single: TrainState, center: np.ndarray) -> dict[str, PyTree]:
    """The checkpointed pytree of one (unreplicated) state and the center."""
    return {
        "params": single.params,
        "batch_stats": single.batch_stats,
        "opt_state": single.opt_state,
        "step": np.asarray(single.step, np.int32),
        "rng": np.asarray(jax.random.key_data(single.rng)),
        "center": np.asarray(center, np.float32),
    }


def host_state(state: TrainState, center: np.ndarray) -> dict[str, PyTree]:
    """The checkpointed pytree: device 0's copy of the replicated state, plus the center."""
    return host_tree(jax.device_get(jax.tree.map(lambda x: x[0], state)), center)


def train_state(host: dict[str, PyTree]) -> TrainState:
    """The (unreplicated) :class:`TrainState` of a restored checkpoint."""
    return TrainState(
        params=host["params"],
        batch_stats=host["batch_stats"],
        opt_state=host["opt_state"],
        step=jnp.asarray(host["step"], jnp.int32),
        rng=jax.random.wrap_key_data(jnp.asarray(host["rng"])),
    )


def check_run_info(workdir: str, identity: dict[str, Any]) -> None:
    """Compares with ``run.json`` of an earlier run in ``workdir``, before anything is written."""
    path = os.path.join(workdir, RUN_INFO_FILE)
    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as handle:
            info = json.load(handle)
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} cannot be read ({type(err).__name__}: {err}); use a new --workdir."
        ) from err
    check_identity(saved_identity(info), identity)


def write_run_info(
    workdir: str, config: ml_collections.ConfigDict, prep: Preprocessing, identity: dict[str, Any]
) -> None:
    """Writes ``run.json``: the configuration, the preprocessing and the run's identity."""
    info = {
        "config": config.to_dict(),
        "preprocessing": dataclasses.asdict(prep),
        "identity": identity,
    }
    write_atomically(os.path.join(workdir, RUN_INFO_FILE), json.dumps(info, indent=2))


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def restore_newest_intact(
    checkpoints: RunCheckpoints, template: dict[str, PyTree], identity: dict[str, Any], workdir: str
) -> tuple[dict[str, PyTree], dict[str, Any]] | None:
    """The newest intact checkpoint of this run, moving damaged ones aside; None if none is left.

    Raises:
      CheckpointError: a checkpoint of a different run or model.
    """
    damaged = 0
    for step in reversed(checkpoints.all_steps()):
        try:
            check_identity(saved_identity(checkpoints.read_progress(step)), identity)
            return checkpoints.restore(template, step)
        except DamagedCheckpointError as err:
            damaged += 1
            if distributed.is_main_process():
                moved = checkpoints.move_aside(step, os.path.join(workdir, DAMAGED_DIR))
                logger.warning("%s; moved it to %s, trying the one before.", err, moved)
            _sync_processes(f"msad_jax_moved_checkpoint_{step}")
            checkpoints.reload()
    if damaged:
        logger.warning(
            "No intact checkpoint is left in %s; starting afresh.", checkpoints.directory
        )
    return None
