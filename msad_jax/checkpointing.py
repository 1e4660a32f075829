"""Orbax checkpoints of a fine-tuning run: the training state plus where the run stood.

``<workdir>/checkpoints/<step>/`` holds ``state`` (parameters, BatchNorm statistics, optimizer
state, step, PRNG key and the center, which a resumed run must reuse) and ``progress`` (JSON:
position, history, configuration and the sha256 digest of ``state``). Saving is asynchronous and
atomic. A checkpoint that cannot be read, fails its digest or holds NaN/inf is damaged
(:class:`DamagedCheckpointError`) and can be moved aside, never deleted.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from msad_jax.digest import tree_digest
from msad_jax.errors import CheckpointError, DamagedCheckpointError

PyTree = Any

DIGEST_KEY = "state_sha256"
"""Key of the ``state`` digest in a checkpoint's ``progress`` JSON."""
FINITE_ITEMS = ("params", "batch_stats", "center")
"""Items of the state that must be finite (a NaN there is damage, never a checkpointed value)."""
# What reading a damaged checkpoint raises: tensorstore and JSON errors are ValueErrors, missing
# files OSErrors, a missing tree entry a KeyError.
READ_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, KeyError, EOFError)

__all__ = [
    "DIGEST_KEY",
    "FINITE_ITEMS",
    "READ_ERRORS",
    "CheckpointError",
    "DamagedCheckpointError",
    "RunCheckpoints",
    "non_finite_items",
    "tree_digest",
]


def non_finite_items(state: Mapping[str, PyTree], items: Iterable[str] = FINITE_ITEMS) -> list[str]:
    """The ``items`` of ``state`` with a NaN or infinite floating-point value."""
    bad = []
    for item in items:
        leaves = jax.tree.leaves(state.get(item, {}))
        arrays = (np.asarray(x) for x in leaves)
        if not all(np.isfinite(a).all() for a in arrays if np.issubdtype(a.dtype, np.floating)):
            bad.append(item)
    return bad


def _private_copy(leaf: Any) -> np.ndarray:
    array = np.array(leaf, copy=True)
    array.setflags(write=False)
    return array


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


class RunCheckpoints:
    """Saves, verifies and restores a run's checkpoints under ``directory``.

    Args:
      directory: the checkpoint folder (created if needed and ``create``).
      max_to_keep: how many of the newest checkpoints to keep.
      asynchronous: write in a background thread.
      keep_steps: steps never deleted by the rotation (e.g. the one ``detector.npz`` was built
        from).
      create: create ``directory`` if it does not exist (False for readers).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int = 2,
        asynchronous: bool = True,
        keep_steps: Sequence[int] = (),
        create: bool = True,
    ):
        self.directory = os.path.abspath(os.fspath(directory))
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            create=create,
            enable_async_checkpointing=asynchronous,
            preservation_policy=policies.AnyPreservationPolicy(
                [policies.LatestN(n=max_to_keep), policies.CustomSteps(list(keep_steps))]
            ),
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "progress": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        """Global step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def folder(self, step: int) -> str:
        """The folder of checkpoint ``step``."""
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: PyTree, progress: Mapping[str, Any]) -> None:
        """Starts saving ``state`` (host arrays) and ``progress`` (JSON-able) as ``step``."""
        if step in self._manager.all_steps():
            return
        state = jax.tree.map(_private_copy, state)
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                progress=ocp.args.JsonSave({**progress, DIGEST_KEY: tree_digest(state)}),
            ),
        )

    def _damaged(self, step: int, reason: str) -> DamagedCheckpointError:
        folder = self.folder(step)
        return DamagedCheckpointError(
            f"Checkpoint {folder} is damaged: {reason}", step=step, folder=folder
        )

    def _step_or_latest(self, step: int | None, hint: str = "") -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"No checkpoint in {self.directory}{hint}.")
        return step

    def read_progress(self, step: int | None = None) -> dict[str, Any]:
        """The ``progress`` JSON of a checkpoint (without its digest entry).

        Raises:
          DamagedCheckpointError: the JSON cannot be read.
        """
        step = self._step_or_latest(step)
        return {k: v for k, v in self._read_progress(step).items() if k != DIGEST_KEY}

    def _read_progress(self, step: int) -> dict[str, Any]:
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(progress=ocp.args.JsonRestore())
            )
            progress = restored.progress
        except READ_ERRORS as err:
            reason = f"its progress record cannot be read ({_first_line(err)})"
            raise self._damaged(step, reason) from err
        if not isinstance(progress, dict):
            raise self._damaged(step, "its progress record is not a JSON object")
        return dict(progress)

    def _check_structure(self, abstract: PyTree, step: int) -> None:
        """A checkpoint of another model or optimizer is refused (it is not damaged)."""
        try:
            metadata = self._manager.item_metadata(step)["state"]
        except READ_ERRORS as err:
            raise self._damaged(step, f"its metadata cannot be read ({_first_line(err)})") from err
        if metadata is None:
            raise self._damaged(step, "its metadata is missing")

        def shapes(tree: PyTree) -> list[tuple[tuple[int, ...], str]]:
            leaves = jax.tree.leaves(tree)
            return sorted((tuple(x.shape), np.dtype(x.dtype).str) for x in leaves)

        if shapes(abstract) != shapes(metadata):
            raise CheckpointError(
                f"Checkpoint {self.folder(step)} was written by a different model or optimizer "
                "than this run's config; use a new --workdir or restore the original config."
            )

    def _read_state(self, step: int, abstract: PyTree | None) -> PyTree:
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            )
            return jax.tree.map(np.asarray, restored.state)
        except READ_ERRORS as err:
            raise self._damaged(step, f"its arrays cannot be read ({_first_line(err)})") from err

    def _verify(self, step: int, state: PyTree, progress: Mapping[str, Any]) -> None:
        saved = progress.get(DIGEST_KEY)
        if saved is not None and tree_digest(state) != saved:
            raise self._damaged(
                step, "its arrays differ from the sha256 digest stored when it was saved"
            )
        bad = non_finite_items(state)
        if bad:
            raise self._damaged(step, f"its {', '.join(bad)} hold NaN or infinite values")

    def restore(self, template: PyTree, step: int | None = None) -> tuple[PyTree, dict[str, Any]]:
        """Reads and verifies a checkpoint into the structure of ``template``.

        Args:
          template: a pytree shaped like the saved state (arrays or ShapeDtypeStructs).
          step: which checkpoint; default the newest.

        Returns:
          ``(state, progress)``.

        Raises:
          DamagedCheckpointError: unreadable, not what was saved, or holding NaN/inf.
          CheckpointError: no checkpoint, or one of a different model or optimizer.
        """
        step = self._step_or_latest(step)
        abstract = jax.tree.map(
            lambda x: (
                x
                if isinstance(x, jax.ShapeDtypeStruct)
                else jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
            ),
            template,
        )
        progress = self._read_progress(step)
        self._check_structure(abstract, step)
        state = self._read_state(step, abstract)
        self._verify(step, state, progress)
        return state, {k: v for k, v in progress.items() if k != DIGEST_KEY}

    def restore_arrays(self, step: int | None = None) -> dict[str, Any]:
        """Reads and verifies the ``state`` item as plain nested dicts/lists of arrays.

        Raises:
          DamagedCheckpointError: unreadable, not what was saved, or holding NaN/inf.
          CheckpointError: no checkpoint.
        """
        step = self._step_or_latest(step, "; train a model there first")
        progress = self._read_progress(step)
        state = self._read_state(step, None)
        self._verify(step, state, progress)
        return state

    def move_aside(self, step: int, destination: str | os.PathLike) -> str:
        """Moves checkpoint ``step`` to ``destination/<step>`` (``<step>-2``, ... if taken).

        Returns:
          The checkpoint's new folder.
        """
        destination = os.fspath(destination)
        os.makedirs(destination, exist_ok=True)
        target = os.path.join(destination, str(step))
        copy = 1
        while os.path.lexists(target):
            copy += 1
            target = os.path.join(destination, f"{step}-{copy}")
        os.rename(self.folder(step), target)
        self.reload()
        return target

    def reload(self) -> None:
        """Re-reads the list of checkpoints (after another process moved one)."""
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until pending saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager's resources."""
        self._manager.wait_until_finished()
        self._manager.close()
