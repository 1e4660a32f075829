"""SGD with coupled weight decay on the trainable parameters only (SPEC §5).

The update of a trainable parameter is ``p <- p - lr * (g + wd * p)`` (PyTorch ``SGD`` with
``weight_decay`` and no momentum); a frozen parameter gets exactly zero update and no decay.
Frozen parameters are selected by regular expressions matched with ``re.search`` against the
'/'-joined path of each parameter, e.g. ``'layer1/0/conv1/kernel'``; the ResNet-152 default is
``('^conv1/', '^bn1/', '^layer1/', '^layer2/')``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import optax

from msad_jax.errors import InputError

PyTree = Any

TRAINABLE = "trainable"
FROZEN = "frozen"


def _key_name(key: Any) -> str:
    """One component of a pytree path as a string."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def param_paths(params: PyTree) -> PyTree:
    """The '/'-joined path of every leaf, e.g. ``'layer1/0/conv1/kernel'``.

    Args:
      params: parameter pytree (nested dicts as produced by Flax).

    Returns:
      A pytree of the same structure whose leaves are path strings.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "/".join(_key_name(k) for k in path), params
    )


def _compile_patterns(frozen: Sequence[str]) -> list[re.Pattern[str]]:
    """Compiles the frozen patterns, rejecting a bare string and invalid regexes."""
    if isinstance(frozen, str):
        raise InputError(
            f"frozen must be a sequence of patterns, got the string {frozen!r}; "
            f"write ({frozen!r},) for a single pattern"
        )
    compiled = []
    for pattern in frozen:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise InputError(f"frozen pattern {pattern!r} is not a valid regex: {err}") from err
    return compiled


def trainable_mask(params: PyTree, frozen: Sequence[str] = ()) -> PyTree:
    """Marks every parameter as trainable (True) or frozen (False).

    A parameter is frozen when any pattern in ``frozen`` matches its '/'-joined path
    (``re.search``).

    Args:
      params: parameter pytree.
      frozen: regular expressions selecting frozen parameters.

    Returns:
      A pytree of Python bools with the structure of ``params``.

    Raises:
      ValueError: if a pattern is not a valid regex or matches no parameter (likely a typo); the
        message lists the valid top-level names.
    """
    patterns = _compile_patterns(frozen)
    paths = jax.tree_util.tree_leaves(param_paths(params))
    for pattern in patterns:
        if not any(pattern.search(path) for path in paths):
            top = sorted({path.split("/")[0] for path in paths})
            raise InputError(
                f"frozen pattern {pattern.pattern!r} matches no parameter; "
                f"top-level parameter names are {top} (e.g. use '^layer1/')"
            )
    return jax.tree_util.tree_map(
        lambda path: not any(p.search(path) for p in patterns), param_paths(params)
    )


def make_optimizer(
    params: PyTree,
    *,
    learning_rate: float = 1e-5,
    weight_decay: float = 5e-5,
    frozen: Sequence[str] = (),
) -> optax.GradientTransformation:
    """SGD without momentum, coupled weight decay, constant rate, on trainable parameters only.

    Trainable: ``update = -lr * (g + wd * p)``. Frozen: ``update = 0`` (their gradients are ignored
    and may be zeros). No clipping, no schedule.

    Args:
      params: parameter pytree (used for its structure and paths).
      learning_rate: constant learning rate ``lr``.
      weight_decay: coupled L2 coefficient ``wd``.
      frozen: regular expressions selecting frozen parameters (see :func:`trainable_mask`).

    Returns:
      An optax gradient transformation; ``update`` needs ``params``.

    Raises:
      ValueError: for a negative rate or decay, or a frozen pattern that matches nothing.
    """
    if not learning_rate > 0:
        raise InputError(f"learning_rate must be > 0, got {learning_rate}")
    if not weight_decay >= 0:
        raise InputError(f"weight_decay must be >= 0, got {weight_decay}")
    labels = jax.tree_util.tree_map(
        lambda trainable: TRAINABLE if trainable else FROZEN, trainable_mask(params, frozen)
    )
    sgd = optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(learning_rate, momentum=None),
    )
    return optax.partition({TRAINABLE: sgd, FROZEN: optax.set_to_zero()}, labels)
