"""Orbax checkpoints of a fine-tuning run: the training state plus where the run stood.

A checkpoint (``<workdir>/checkpoints/<global step>/``) holds two items:

* ``state``: a pytree of NumPy arrays -- parameters, BatchNorm statistics, optimizer state, step,
  PRNG key data and the center (the center is fixed before training, so a resumed run must reuse
  it rather than recompute it from a half-trained model);
* ``progress``: JSON -- epoch, step within the epoch, the per-epoch evaluation history so far and
  the run's configuration.

Saving is asynchronous (training continues while the files are written) and atomic: orbax writes
into a temporary folder and renames it when complete, so a run killed mid-save leaves the previous
checkpoint intact and the partial one is ignored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from msad_jax.errors import UserError

PyTree = Any


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be read or does not fit the run; the message says what to do."""


class RunCheckpoints:
    """Saves and restores a run's checkpoints under ``directory``.

    Args:
      directory: the checkpoint folder (created if needed).
      max_to_keep: how many of the newest checkpoints to keep.
      asynchronous: write in a background thread.
    """

    def __init__(
        self, directory: str | os.PathLike, *, max_to_keep: int = 2, asynchronous: bool = True
    ):
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=asynchronous,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "progress")
        )

    def latest_step(self) -> int | None:
        """Global step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def save(self, step: int, state: PyTree, progress: Mapping[str, Any]) -> None:
        """Starts saving ``state`` (host arrays) and ``progress`` (JSON-able) as ``step``.

        A checkpoint for ``step`` that already exists is kept as it is.
        """
        if step in self._manager.all_steps():
            return
        state = jax.tree.map(np.asarray, state)
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                progress=ocp.args.JsonSave(dict(progress)),
            ),
        )

    def restore(self, template: PyTree, step: int | None = None) -> tuple[PyTree, dict[str, Any]]:
        """Reads a checkpoint into the structure of ``template``.

        Args:
          template: a pytree shaped like the saved state (arrays or ShapeDtypeStructs).
          step: which checkpoint; default the newest.

        Returns:
          ``(state, progress)``.

        Raises:
          CheckpointError: no checkpoint, or one that is corrupt or does not fit ``template``.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"No checkpoint in {self.directory}.")
        abstract = jax.tree.map(
            lambda x: (
                jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
                if not isinstance(x, jax.ShapeDtypeStruct)
                else x
            ),
            template,
        )
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract),
                    progress=ocp.args.JsonRestore(),
                ),
            )
            state = jax.tree.map(np.asarray, restored.state)
            progress = dict(restored.progress)
        except Exception as err:  # noqa: BLE001 -- any failure to read means the same to the user.
            reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            raise CheckpointError(
                f"Checkpoint {os.path.join(self.directory, str(step))} cannot be read ({reason}); "
                "delete that folder to resume from the previous checkpoint, or start afresh "
                "with a new --workdir."
            ) from None
        self._check_shapes(abstract, state, step)
        return state, progress

    def restore_arrays(self, step: int | None = None) -> dict[str, Any]:
        """Reads the ``state`` item as plain nested dicts/lists of arrays, without a template.

        Enough to read parameters, BatchNorm statistics and the center (e.g. for inference);
        optimizer states come back as plain containers.

        Raises:
          CheckpointError: no checkpoint, or a corrupt one.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"No checkpoint in {self.directory}; train a model there first.")
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
            )
        except Exception as err:  # noqa: BLE001 -- any failure to read means the same to the user.
            raise CheckpointError(
                f"Checkpoint {os.path.join(self.directory, str(step))} cannot be read "
                f"({type(err).__name__}); delete that folder to use the previous checkpoint."
            ) from None
        return jax.tree.map(np.asarray, restored.state)

    def _check_shapes(self, abstract: PyTree, state: PyTree, step: int) -> None:
        want = [tuple(x.shape) for x in jax.tree.leaves(abstract)]
        got = [tuple(np.shape(x)) for x in jax.tree.leaves(state)]
        if want != got:
            raise CheckpointError(
                f"Checkpoint {os.path.join(self.directory, str(step))} was written by a different "
                "model or optimizer than this run's config; use a new --workdir or restore the "
                "original config."
            )

    def wait(self) -> None:
        """Blocks until pending saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager's resources."""
        self._manager.wait_until_finished()
        self._manager.close()
