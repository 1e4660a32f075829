"""sha256 digests of pytrees of arrays, independent of their container types."""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import numpy as np

PyTree = Any


def named_leaves(tree: PyTree) -> list[tuple[str, np.ndarray]]:
    """The leaves of ``tree`` as ``(path, array)``, the path joined with ``/``, sorted by path."""
    named = [
        (jax.tree_util.keystr(path, simple=True, separator="/"), np.asarray(leaf))
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]
    return sorted(named, key=lambda item: item[0])


def tree_digest(tree: PyTree) -> str:
    """sha256 of a pytree's arrays: names, dtypes, shapes and bytes, in a fixed leaf order."""
    digest = hashlib.sha256()
    for name, array in named_leaves(tree):
        digest.update(f"{name}|{array.dtype.str}|{array.shape};".encode())
        digest.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    return digest.hexdigest()
