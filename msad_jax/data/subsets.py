"""Deterministic subsets of a one-class problem, for quick experiments on small machines.

Subsets change the protocol (SPEC §8 uses every image): results are not comparable with published
numbers; reports record the counts used.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from msad_jax.data.protocols import OneClassData


def _stratified(classes: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``count`` items, drawn in proportion to each class's size."""
    ids, sizes = np.unique(classes, return_counts=True)
    quota = np.floor(sizes * count / len(classes)).astype(int)
    # Hand out the remainder to the classes with the largest fractional parts (ties: lower id).
    fractional = sizes * count / len(classes) - quota
    for i in np.argsort(-fractional, kind="stable")[: count - quota.sum()]:
        quota[i] += 1
    picked = [
        rng.permutation(np.flatnonzero(classes == c))[:q] for c, q in zip(ids, quota, strict=True)
    ]
    return np.sort(np.concatenate(picked))


def subsample(
    data: OneClassData, *, train_images: int = 0, test_images: int = 0, seed: int = 0
) -> OneClassData:
    """A seeded subset: ``train_images`` normal training images and ``test_images`` test images.

    Args:
      data: the full problem.
      train_images: number of training images to keep (0 = all).
      test_images: number of test images to keep (0 = all).
      seed: NumPy seed of the selection.

    Returns:
      The reduced :class:`OneClassData` (images in their original order).
    """
    rng = np.random.default_rng([seed, 271828])
    changes = {}
    if 0 < train_images < len(data.train_images):
        keep = np.sort(rng.permutation(len(data.train_images))[:train_images])
        changes["train_images"] = data.train_images[keep]
    if 0 < test_images < len(data.test_images):
        keep = _stratified(data.test_classes, test_images, rng)
        changes.update(
            test_images=data.test_images[keep],
            test_labels=data.test_labels[keep],
            test_classes=data.test_classes[keep],
        )
    return dataclasses.replace(data, **changes) if changes else data
