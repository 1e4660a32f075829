"""One-class protocol on in-memory arrays and the OneClassData contract."""

import numpy as np
import pytest

from msad_jax.data import LabelledArrays, OneClassData, class_names, load_one_class, num_classes


def labelled(seed=0, n_train=40, n_test=30, size=8, channels=3, k=4):
    rng = np.random.default_rng(seed)
    shape = (size, size) if channels is None else (size, size, channels)
    return LabelledArrays(
        train_images=rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        train_labels=rng.integers(0, k, n_train),
        test_images=rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
        test_labels=rng.integers(0, k, n_test),
    )


def test_arrays_one_vs_rest():
    arrays = labelled()
    data = load_one_class("arrays", 2, arrays=arrays)
    keep = arrays.train_labels == 2
    np.testing.assert_array_equal(data.train_images, arrays.train_images[keep])
    np.testing.assert_array_equal(data.test_images, arrays.test_images)
    np.testing.assert_array_equal(data.test_labels, (arrays.test_labels != 2).astype(int))
    np.testing.assert_array_equal(data.test_classes, arrays.test_labels)
    assert data.counts()["test_normal"] == int((arrays.test_labels == 2).sum())
    assert data.counts()["train"] == int(keep.sum())
    assert num_classes("arrays", arrays=arrays) == 4
    assert class_names("arrays", arrays=arrays) == ["0", "1", "2", "3"]


def test_named_classes_gray_and_rgba_inputs_and_resizing():
    gray = labelled(1, channels=None)
    named = LabelledArrays(
        *[getattr(gray, f) for f in ("train_images", "train_labels", "test_images", "test_labels")],
        class_names=("a", "b", "c", "d"),
    )
    data = load_one_class("arrays", "c", arrays=named)
    assert data.normal_class == 2 and data.normal_class_name == "c"
    assert data.train_images.shape[-1] == 3
    np.testing.assert_array_equal(
        data.train_images[..., 1], gray.train_images[gray.train_labels == 2]
    )
    rgba = labelled(2, channels=4)
    resized = load_one_class("arrays", 0, arrays=rgba, image_size=12)
    assert resized.test_images.shape == (30, 12, 12, 3)


def test_one_class_data_rejects_inconsistent_fields():
    ok = dict(
        train_images=np.zeros((2, 4, 4, 3), np.uint8),
        test_images=np.zeros((3, 4, 4, 3), np.uint8),
        test_labels=np.array([0, 1, 1]),
        test_classes=np.array([0, 1, 2]),
        class_names=["a", "b", "c"],
        normal_class=0,
        name="x",
    )
    OneClassData(**ok)
    with pytest.raises(ValueError, match="uint8"):
        OneClassData(**{**ok, "train_images": np.zeros((2, 4, 4, 3), np.float32)})
    with pytest.raises(ValueError, match="differ in size"):
        OneClassData(**{**ok, "test_images": np.zeros((3, 5, 5, 3), np.uint8)})
    with pytest.raises(ValueError, match="0 \\(normal\\) or 1"):
        OneClassData(**{**ok, "test_labels": np.array([0, 2, 1])})
    with pytest.raises(ValueError, match="No training images"):
        OneClassData(**{**ok, "train_images": np.zeros((0, 4, 4, 3), np.uint8)})


def test_argument_errors():
    with pytest.raises(ValueError, match="needs arrays"):
        load_one_class("arrays", 0)
    with pytest.raises(ValueError, match="uint8"):
        bad = labelled()
        load_one_class(
            "arrays",
            0,
            arrays=LabelledArrays(
                bad.train_images.astype(np.float32),
                bad.train_labels,
                bad.test_images,
                bad.test_labels,
            ),
        )
    with pytest.raises(ValueError, match="not one of"):
        load_one_class("arrays", "zebra", arrays=labelled())
    with pytest.raises(ValueError, match="valid names"):
        class_names("mnist")
    with pytest.raises(ValueError, match="num_classes"):
        load_one_class("arrays", "all", arrays=labelled())
