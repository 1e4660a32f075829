"""scikit-learn's digits as a one-class source: pixel scaling, the fixed split, the protocol."""

import numpy as np
import pytest
from sklearn.datasets import load_digits

from msad_jax import train
from msad_jax.config import default_config, validate_config
from msad_jax.data import DATASETS, class_names, digits, load_one_class


@pytest.fixture(scope="module")
def sklearn_digits():
    return load_digits()


@pytest.fixture(scope="module")
def arrays():
    return digits.load_digits_arrays()


def test_pixels_scale_to_0_255_rounding_half_up():
    values = np.arange(17)
    expected = (2 * 255 * values + 16) // 32  # floor(255 x / 16 + 1/2) in integer arithmetic
    scaled = digits.to_uint8(values)
    assert scaled.dtype == np.uint8
    np.testing.assert_array_equal(scaled, expected)
    assert (scaled[0], scaled[8], scaled[16]) == (0, 128, 255)
    np.testing.assert_array_equal(digits.to_uint8(values, invert=True), 255 - expected)


@pytest.mark.parametrize("bad", [-1.0, 16.5])
def test_pixels_outside_the_range_are_rejected(bad):
    with pytest.raises(ValueError, match=r"\[0, 16\]"):
        digits.to_uint8(np.array([0.0, bad]))


def test_split_is_stratified_disjoint_and_complete(sklearn_digits):
    labels = sklearn_digits.target
    train_idx, test_idx = digits.split_indices(labels)
    assert len(np.intersect1d(train_idx, test_idx)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train_idx, test_idx])), np.arange(1797))
    assert np.all(np.diff(train_idx) > 0) and np.all(np.diff(test_idx) > 0)
    per_class = np.bincount(labels, minlength=10)
    np.testing.assert_array_equal(
        np.bincount(labels[train_idx], minlength=10), np.round(per_class * 2 / 3).astype(int)
    )
    assert (len(train_idx), len(test_idx)) == (1198, 599)


def test_split_is_fixed_by_the_seed_and_per_class(sklearn_digits):
    labels = sklearn_digits.target
    first = digits.split_indices(labels)
    again = digits.split_indices(labels.copy())
    other = digits.split_indices(labels, seed=digits.DIGITS_SEED + 100)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])
    # A class's split depends only on its own members: dropping the other classes keeps it.
    threes = np.flatnonzero(labels == 3)
    only_threes = digits.split_indices(labels[threes])
    np.testing.assert_array_equal(threes[only_threes[0]], first[0][labels[first[0]] == 3])
    # Not a trivial split (e.g. the first two thirds of each class).
    assert not np.array_equal(threes[only_threes[0]], threes[: len(only_threes[0])])


def test_bad_train_fraction_is_rejected():
    with pytest.raises(ValueError, match="train_fraction"):
        digits.split_indices(np.zeros(10, int), train_fraction=1.0)


def test_arrays_are_sklearns_images_scaled_and_split(sklearn_digits, arrays):
    train_images, train_labels, test_images, test_labels = arrays
    train_idx, test_idx = digits.split_indices(sklearn_digits.target)
    for images, labels, idx in ((train_images, train_labels, train_idx),
                                (test_images, test_labels, test_idx)):  # fmt: skip
        assert images.dtype == np.uint8 and images.shape == (len(idx), 8, 8, 3)
        np.testing.assert_array_equal(labels, sklearn_digits.target[idx])
        expected = np.rint(sklearn_digits.images[idx] * 255 / 16 + 1e-9)  # ties (8) round up
        if digits.DEFAULT_INVERT:
            expected = 255 - expected
        for channel in range(3):
            np.testing.assert_array_equal(images[..., channel], expected)


def test_inverted_arrays_are_the_negatives(arrays):
    inverted = digits.load_digits_arrays(invert=not digits.DEFAULT_INVERT)
    np.testing.assert_array_equal(inverted[0], 255 - arrays[0])
    np.testing.assert_array_equal(inverted[2], 255 - arrays[2])
    np.testing.assert_array_equal(inverted[3], arrays[3])


def test_one_class_protocol(sklearn_digits, arrays):
    assert "digits" in DATASETS
    assert class_names("digits") == [str(d) for d in range(10)]
    data = load_one_class("digits", 3)
    train_images, train_labels, test_images, test_labels = arrays
    np.testing.assert_array_equal(data.train_images, train_images[train_labels == 3])
    np.testing.assert_array_equal(data.test_images, test_images)
    np.testing.assert_array_equal(data.test_labels, (test_labels != 3).astype(np.int32))
    np.testing.assert_array_equal(data.test_classes, test_labels)
    n3 = int(np.sum(sklearn_digits.target == 3))
    assert data.counts() == {
        "train": round(n3 * 2 / 3),
        "test": 599,
        "test_normal": n3 - round(n3 * 2 / 3),
        "test_anomalous": 599 - (n3 - round(n3 * 2 / 3)),
    }
    assert data.normal_class_name == "3" and data.name == "digits"
    assert load_one_class("digits", "7").normal_class == 7
    assert load_one_class("digits", 0, image_size=32).train_images.shape[1:] == (32, 32, 3)


@pytest.mark.parametrize(("normal_class", "fragment"), [(10, "out of range"), ("all", "each")])
def test_bad_normal_class(normal_class, fragment):
    with pytest.raises(ValueError, match=fragment):
        load_one_class("digits", normal_class)


def test_the_main_job_loads_digits_through_the_config():
    config = default_config()
    config.dataset = "digits"
    config.normal_class = "all"
    validate_config(config)
    assert train.class_names(config) == [str(d) for d in range(10)]
    assert train.normal_classes(config) == list(range(10))
    config.normal_class = "5"
    data = train.load_data(config, 5)
    assert data.train_images.shape[1:] == (8, 8, 3) and data.normal_class == 5
