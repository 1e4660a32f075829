"""What a finished run leaves for inference: ``run.json`` and ``detector.npz``.

The only module training and inference share, so scoring imports no training code.
``detector.npz`` (read with ``allow_pickle=False``) holds ``gallery`` (phi of the normal training
images), ``variables/...`` (inference variables; older files have none and name a checkpoint),
``checkpoint_step``, ``knn_k``, ``image_side``, the threshold (``calibration_scores``,
``calibration``, ``target_fpr``, ``threshold``; older files: ``train_scores`` and a quantile
threshold), ``test_scores``/``test_labels``, and ``sha256`` of all the other arrays.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from msad_jax.digest import named_leaves, tree_digest
from msad_jax.errors import CheckpointError

PyTree = Any

DETECTOR_FILE = "detector.npz"
RUN_INFO_FILE = "run.json"
VARIABLES_PREFIX = "variables/"
REQUIRED_KEYS = ("gallery", "threshold", "image_side")


def detector_arrays_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """The digest ``detector.npz`` stores of its other arrays (:func:`tree_digest`)."""
    return tree_digest({k: v for k, v in arrays.items() if k != "sha256"})


def flatten_variables(variables: Mapping[str, PyTree]) -> dict[str, np.ndarray]:
    """``{'variables/params/conv1/kernel': array, ...}`` of nested dicts of arrays.

    Raises:
      ValueError: a container that is not a dict with string keys free of ``/`` (a bug: Flax
        variables are nested dicts).
    """
    for path, _ in jax.tree_util.tree_flatten_with_path(dict(variables))[0]:
        for key in path:
            name = getattr(key, "key", None)
            if not isinstance(name, str) or "/" in name:
                raise ValueError(f"Variables must be nested dicts with str keys, got {path}.")
    return {VARIABLES_PREFIX + name: array for name, array in named_leaves(dict(variables))}


def unflatten_variables(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The nested dicts of the ``variables/...`` entries of ``arrays`` ({} if there are none)."""
    tree: dict[str, Any] = {}
    for key, array in arrays.items():
        if not key.startswith(VARIABLES_PREFIX):
            continue
        *parents, leaf = key[len(VARIABLES_PREFIX) :].split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = array
    return tree


def write_atomically(path: str | os.PathLike, data: str | bytes) -> None:
    """Writes ``data`` via a temporary file renamed over ``path`` (a kill leaves the old one)."""
    temporary = f"{os.fspath(path)}.tmp"
    with open(temporary, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
    os.replace(temporary, path)


def write_detector_file(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    """Writes ``arrays`` and their digest to ``path`` atomically (a kill leaves the old file)."""
    arrays = {**arrays, "sha256": np.asarray(detector_arrays_digest(arrays))}
    temporary = f"{path}.tmp"
    with open(temporary, "wb") as handle:
        np.savez(handle, **arrays)
    os.replace(temporary, path)


def recorded_detector_step(workdir: str) -> int | None:
    """The checkpoint step ``<workdir>/detector.npz`` was built from (None: none recorded)."""
    try:
        with np.load(os.path.join(workdir, DETECTOR_FILE)) as saved:
            return int(saved["checkpoint_step"]) if "checkpoint_step" in saved else None
    except (OSError, ValueError, KeyError, EOFError):
        return None


def read_detector_file(path: str) -> dict[str, np.ndarray]:
    """The arrays of a ``detector.npz``, verified against the digest stored in it.

    Raises:
      CheckpointError: the file cannot be read, does not match its digest, lacks a required array,
        or its gallery, threshold, calibration scores or variables are not finite.
    """
    remedy = "run the training again in the same workdir to rewrite it"
    try:
        with np.load(path, allow_pickle=False) as saved:
            arrays = {name: saved[name] for name in saved.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise CheckpointError(
            f"Detector file {path} cannot be read ({type(err).__name__}: {err}); {remedy}."
        ) from err
    stored = arrays.get("sha256")
    if stored is not None and str(stored) != detector_arrays_digest(arrays):
        raise CheckpointError(
            f"Detector file {path} is damaged: its arrays differ from the sha256 digest stored "
            f"when it was written; {remedy}."
        )
    missing = [k for k in REQUIRED_KEYS if k not in arrays]
    if missing:
        raise CheckpointError(f"Detector file {path} lacks {', '.join(missing)}; {remedy}.")
    checked = ["gallery", "threshold", "calibration_scores", "train_scores"]
    checked += [k for k in arrays if k.startswith(VARIABLES_PREFIX)]
    bad = [
        k
        for k in checked
        if k in arrays
        and np.issubdtype(arrays[k].dtype, np.floating)
        and not np.isfinite(arrays[k]).all()
    ]
    if bad:
        shown = ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else "")
        raise CheckpointError(
            f"Detector file {path} is damaged: {shown} hold NaN or infinite values; {remedy}."
        )
    return arrays
