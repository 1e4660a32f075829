"""sha256 digests of pytrees of arrays, independent of their container types.

Checkpoints (:mod:`msad_jax.checkpointing`) and detector files (:mod:`msad_jax.run_files`) store
the digest of their arrays when they are written and compare it when they are read, so that a
damaged file is detected whatever its storage format. Imports only NumPy and JAX's tree utilities.
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import numpy as np

PyTree = Any


def named_leaves(tree: PyTree) -> list[tuple[str, np.ndarray]]:
    """The leaves of ``tree`` as ``(path, array)``, the path joined with ``/``, sorted by path.

    The path is made of dict keys, attribute names and sequence indices, so it does not depend on
    the container types (a namedtuple and the dict it is read back as give the same names).
    """
    named = [
        (jax.tree_util.keystr(path, simple=True, separator="/"), np.asarray(leaf))
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]
    return sorted(named, key=lambda item: item[0])


def tree_digest(tree: PyTree) -> str:
    """sha256 of a pytree's arrays: names, dtypes, shapes and bytes, in a fixed leaf order.

    Leaves are ordered by their path of key names (:func:`named_leaves`), so the digest does not
    depend on the container types: a tree restored without a template (namedtuples read back as
    dicts) has the digest of the tree that was saved.
    """
    digest = hashlib.sha256()
    for name, array in named_leaves(tree):
        digest.update(f"{name}|{array.dtype.str}|{array.shape};".encode())
        digest.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    return digest.hexdigest()
