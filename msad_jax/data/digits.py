"""scikit-learn's handwritten digits as a one-class source: real images with no download.

Split: stratified, ``round(n_c * 2/3)`` per class for training (1198 train / 599 test), ordered
by PCG64's raw output seeded with :data:`DIGITS_SEED` + class (stable across NumPy versions).
Pixels: ``floor(x * 255 / 16 + 0.5)`` as uint8, grey replicated to RGB, native 8x8. Polarity:
bright strokes on black by default (better mean kNN ROC-AUC at 32-64 px,
``benchmarks/results/demo.md``); ``invert=True`` gives ink on paper.
"""

from __future__ import annotations

import numpy as np

#: Class names, index = digit.
CLASS_NAMES: tuple[str, ...] = tuple(str(d) for d in range(10))
#: Seed of the fixed train/test split (per class: ``DIGITS_SEED + class id``).
DIGITS_SEED = 20_220_611
#: Fraction of each class's images used for training (rounded per class).
TRAIN_FRACTION = 2.0 / 3.0
#: Largest pixel value in scikit-learn's digits.
MAX_VALUE = 16
#: Default polarity of the stored images (see the module docstring).
DEFAULT_INVERT = False


def to_uint8(values: np.ndarray, *, invert: bool = DEFAULT_INVERT) -> np.ndarray:
    """Scales digits pixels 0..16 to uint8 0..255 (rounded half up), optionally inverted.

    Args:
      values: pixel values in [0, 16], any shape.
      invert: return ``255 - scaled`` (dark strokes on a light background).

    Returns:
      uint8 array of the same shape.

    Raises:
      ValueError: for values outside [0, 16].
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size and (values.min() < 0 or values.max() > MAX_VALUE):
        raise ValueError(
            f"Digits pixel values must lie in [0, {MAX_VALUE}], got "
            f"[{values.min()}, {values.max()}]."
        )
    scaled = np.floor(values * 255.0 / MAX_VALUE + 0.5).astype(np.uint8)
    return 255 - scaled if invert else scaled


def split_indices(
    labels: np.ndarray, *, seed: int = DIGITS_SEED, train_fraction: float = TRAIN_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
    """The fixed stratified train/test split (see the module docstring).

    Args:
      labels: class id of every image, ``[N]``.
      seed: base seed; class ``c`` uses ``seed + c``.
      train_fraction: fraction of each class for training, in (0, 1).

    Returns:
      ``(train_indices, test_indices)``, each sorted ascending; disjoint, covering ``0..N-1``.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction={train_fraction} must lie in (0, 1).")
    labels = np.asarray(labels).reshape(-1)
    train, test = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)  # sorted ascending
        raw = np.random.PCG64(seed + int(label)).random_raw(len(members))
        shuffled = members[np.argsort(raw, kind="stable")]
        cut = int(round(len(members) * train_fraction))
        train.append(shuffled[:cut])
        test.append(shuffled[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits_arrays(
    *, invert: bool = DEFAULT_INVERT
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The digits with the fixed split, as uint8 RGB images at 8x8.

    Args:
      invert: dark digits on a light background instead of the reverse.

    Returns:
      ``(train_images [N, 8, 8, 3], train_labels [N], test_images [M, 8, 8, 3],
      test_labels [M])``, images uint8, labels int32.
    """
    from sklearn.datasets import load_digits  # imported here: scikit-learn is slow to import

    digits = load_digits()
    images = to_uint8(digits.images, invert=invert)
    images = np.repeat(images[..., None], 3, axis=-1)
    labels = np.asarray(digits.target, dtype=np.int32)
    train, test = split_indices(labels)
    return images[train], labels[train], images[test], labels[test]
