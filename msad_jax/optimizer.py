"""SGD with coupled weight decay on the trainable parameters only (SPEC §5), and the split.

``p <- p - lr * (g + wd * p)`` (PyTorch SGD with ``weight_decay``, no momentum). Frozen parameters
(regexes ``re.search``-ed against '/'-joined paths such as ``'layer1/0/conv1/kernel'``) get no
update and no decay.
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


def param_paths(params: PyTree) -> PyTree:
    """The '/'-joined path of every leaf (e.g. ``'layer1/0/conv1/kernel'``), in a like pytree."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: jax.tree_util.keystr(path, simple=True, separator="/"), params
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
    """A pytree of bools like ``params``: False where a ``frozen`` regex matches the path.

    Raises:
      ValueError: a pattern is not a valid regex or matches no parameter (likely a typo; the message
        lists the valid top-level names).
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


def partition(params: PyTree, frozen: Sequence[str] = ()) -> tuple[PyTree, PyTree]:
    """``(trainable, fixed)``: ``params`` with None in place of the frozen, and of the others."""
    mask = trainable_mask(params, frozen)
    trainable = jax.tree.map(lambda keep, p: p if keep else None, mask, params)
    fixed = jax.tree.map(lambda keep, p: None if keep else p, mask, params)
    return trainable, fixed


def combine(first: PyTree, second: PyTree) -> PyTree:
    """The leaves of ``first``, and of ``second`` where ``first`` has None (undoes partition)."""
    return jax.tree.map(
        lambda a, b: b if a is None else a, first, second, is_leaf=lambda x: x is None
    )


def make_optimizer(
    params: PyTree,
    *,
    learning_rate: float = 1e-5,
    weight_decay: float = 5e-5,
    frozen: Sequence[str] = (),
) -> optax.GradientTransformation:
    """SGD without momentum, coupled weight decay, constant rate, on trainable parameters only.

    Raises:
      ValueError: a non-positive rate, a negative decay, or a frozen pattern that matches nothing.
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
