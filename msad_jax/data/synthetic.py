"""A small synthetic image dataset for smoke runs, notebooks and tests (no download).

Class ``c`` is a sinusoidal grating at ``c * 18`` degrees in a class-specific pair of colours, with
random frequency, phase, contrast and pixel noise: easy for a kNN, yet varied enough for
augmentation and training to matter.
"""

from __future__ import annotations

import numpy as np

from msad_jax.data.protocols import LabelledArrays

CLASS_NAMES: tuple[str, ...] = tuple(f"grating_{18 * c:03d}deg" for c in range(10))


def _palette(num_classes: int) -> np.ndarray:
    """Two RGB colours per class, ``[num_classes, 2, 3]`` in [0, 1]."""
    rng = np.random.default_rng(1234)
    return rng.uniform(0.1, 0.9, size=(num_classes, 2, 3))


def grating_images(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``[N, size, size, 3]`` images of the given class labels (see module doc)."""
    labels = np.asarray(labels)
    n = len(labels)
    colours = _palette(len(CLASS_NAMES))[labels]  # [n, 2, 3]
    angle = labels * np.pi / len(CLASS_NAMES) + rng.normal(0.0, 0.05, n)
    frequency = rng.uniform(2.0, 4.0, n)  # cycles per image
    phase = rng.uniform(0.0, 2 * np.pi, n)
    contrast = rng.uniform(0.6, 1.0, n)
    grid = (np.arange(size) + 0.5) / size
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    along = np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy
    wave = 0.5 + 0.5 * contrast[:, None, None] * np.sin(
        2 * np.pi * frequency[:, None, None] * along + phase[:, None, None]
    )
    images = colours[:, None, None, 0] * wave[..., None] + colours[:, None, None, 1] * (
        1.0 - wave[..., None]
    )
    images = images + rng.normal(0.0, 0.04, images.shape)
    return np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)


def synthetic_arrays(
    *, size: int = 32, train_per_class: int = 200, test_per_class: int = 40, seed: int = 0
) -> LabelledArrays:
    """The synthetic dataset as labelled train/test arrays (deterministic in ``seed``)."""
    rng = np.random.default_rng(seed)
    num_classes = len(CLASS_NAMES)
    train_labels = np.repeat(np.arange(num_classes), train_per_class)
    test_labels = np.repeat(np.arange(num_classes), test_per_class)
    return LabelledArrays(
        train_images=grating_images(train_labels, size, rng),
        train_labels=train_labels,
        test_images=grating_images(test_labels, size, rng),
        test_labels=test_labels,
        class_names=CLASS_NAMES,
    )
