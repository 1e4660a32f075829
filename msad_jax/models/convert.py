"""Strict conversion between torch state dicts and Flax variables.

Flax paths mirror torch keys: ``kernel`` <-> ``weight`` (HWIO <-> OIHW, or transposed for dense
layers), BatchNorm ``scale``/``mean``/``var`` <-> ``weight``/``running_mean``/``running_var``.
Strict: every missing, unexpected or mis-shaped key is reported at once (``num_batches_tracked``
is ignored).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import flax
import numpy as np

from msad_jax.errors import UserError

_LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_COUNTER = "num_batches_tracked"


class StateDictMismatchError(UserError, ValueError):
    """A state dict does not fit a model; the message lists missing/unexpected/mis-shaped keys."""


def _natural_key(key: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that puts ``layer1.2`` before ``layer1.10``."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", key))


def _without_counters(
    state_dict: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]]
) -> dict[str, Any]:
    """Drops torch's ``num_batches_tracked`` counters of the BatchNorm layers that are expected."""
    return {
        k: v
        for k, v in state_dict.items()
        if not (
            k.endswith("." + _COUNTER) and k.removesuffix(_COUNTER) + "running_mean" in expected
        )
    }


def check_state_dict_keys(
    expected: Mapping[str, tuple[int, ...]],
    got: Mapping[str, Any],
    *,
    model_name: str = "the model",
) -> None:
    """Checks that ``got`` has exactly the keys and shapes of ``expected``.

    Args:
      expected: torch key -> expected shape.
      got: torch key -> array (anything with a shape); the ``num_batches_tracked`` counters of
        expected BatchNorm layers are ignored.
      model_name: used in the message.

    Raises:
      StateDictMismatchError: one line listing every missing, unexpected and mis-shaped key.
    """
    got = _without_counters(got, expected)
    missing = sorted(set(expected) - set(got), key=_natural_key)
    unexpected = sorted(set(got) - set(expected), key=_natural_key)
    misshaped = [
        f"{k} {tuple(np.shape(got[k]))} != expected {tuple(expected[k])}"
        for k in sorted(set(expected) & set(got), key=_natural_key)
        if tuple(np.shape(got[k])) != tuple(expected[k])
    ]
    problems = [
        f"{title} ({len(keys)}): {', '.join(keys)}"
        for title, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("wrong shapes", misshaped),
        )
        if keys
    ]
    if problems:
        raise StateDictMismatchError(
            f"State dict does not match {model_name}: {'; '.join(problems)}. "
            "Check that the weights belong to this architecture and variant."
        )


def torch_key(path: tuple[str, ...]) -> str:
    """Maps a Flax variable path ``(collection, *modules, leaf)`` to its torch state-dict key."""
    collection, *modules, leaf = path
    try:
        suffix = _LEAF_TO_TORCH[(collection, leaf)]
    except KeyError:
        raise ValueError(f"No torch equivalent for Flax variable {'/'.join(path)}.") from None
    return ".".join([*modules, suffix])


def _to_torch_layout(array: np.ndarray) -> np.ndarray:
    if array.ndim == 4:
        return np.transpose(array, (3, 2, 0, 1))
    if array.ndim == 2:
        return np.transpose(array, (1, 0))
    return array


def _from_torch_layout(array: np.ndarray) -> np.ndarray:
    if array.ndim == 4:
        return np.transpose(array, (2, 3, 1, 0))
    if array.ndim == 2:
        return np.transpose(array, (1, 0))
    return array


def _flat_variables(variables: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))


def expected_torch_shapes(variables: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Torch key -> torch-layout shape for Flax variables (arrays or ``jax.ShapeDtypeStruct``)."""
    shapes = {}
    for path, leaf in _flat_variables(variables).items():
        shape = tuple(leaf.shape)
        if len(shape) == 4:
            shape = (shape[3], shape[2], shape[0], shape[1])
        elif len(shape) == 2:
            shape = (shape[1], shape[0])
        shapes[torch_key(path)] = shape
    return shapes


def variables_from_torch(
    state_dict: Mapping[str, np.ndarray],
    template: Mapping[str, Any],
    *,
    model_name: str = "the model",
) -> dict[str, Any]:
    """Converts a torch state dict into Flax variables shaped like ``template``.

    Args:
      state_dict: torch key -> array (torch layout).
      template: Flax variables (arrays or ``jax.ShapeDtypeStruct``) giving names, shapes and dtypes.
      model_name: used in error messages.

    Returns:
      ``{'params': ..., 'batch_stats': ...}`` as nested dicts of float32 NumPy arrays (the dtype of
      the template's leaves).

    Raises:
      StateDictMismatchError: if keys or shapes differ.
    """
    check_state_dict_keys(expected_torch_shapes(template), state_dict, model_name=model_name)
    flat = {}
    for path, leaf in _flat_variables(template).items():
        array = np.asarray(state_dict[torch_key(path)])
        flat[path] = np.ascontiguousarray(_from_torch_layout(array)).astype(leaf.dtype)
    return flax.traverse_util.unflatten_dict(flat)


def variables_to_torch(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Converts Flax variables into a torch-layout state dict of NumPy arrays."""
    return {
        torch_key(path): np.ascontiguousarray(_to_torch_layout(np.asarray(leaf)))
        for path, leaf in _flat_variables(variables).items()
    }
