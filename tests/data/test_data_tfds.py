"""TFDS sources under ``tfds.testing.mock_data`` (no data, no network) and their error messages.

The oracle for each protocol is the mocked data source itself, read directly with
``tfds.data_source``: counts, labels and pixels of the one-class split must follow from it.
"""

import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds

from msad_jax.data import load_one_class, registry, tfds_sources
from msad_jax.data.tfds_sources import cats_vs_dogs_split

N = 60


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def direct(name: str, split: str):
    source = tfds.data_source(name, split=split)
    return [source[i] for i in range(len(source))]


def rgb(image):
    image = np.asarray(image)
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


@pytest.mark.parametrize(
    "name,label_key,normal",
    [("cifar10", "label", 3), ("cifar100", "coarse_label", 13), ("fashion_mnist", "label", 7)],
)
def test_fixed_size_datasets_one_class_split(name, label_key, normal, tmp_path):
    with tfds.testing.mock_data(num_examples=N):
        data = load_one_class(name, normal, data_dir=str(tmp_path))
        train = direct(name, "train")
        test = direct(name, "test")
    train_labels = np.asarray([ex[label_key] for ex in train])
    test_labels = np.asarray([ex[label_key] for ex in test])
    assert (test_labels != normal).any() and (test_labels == normal).any()
    expected_train = np.stack([rgb(ex["image"]) for ex in train])[train_labels == normal]
    np.testing.assert_array_equal(data.train_images, expected_train)
    np.testing.assert_array_equal(data.test_images, np.stack([rgb(ex["image"]) for ex in test]))
    np.testing.assert_array_equal(data.test_classes, test_labels)
    np.testing.assert_array_equal(data.test_labels, (test_labels != normal).astype(int))
    counts = data.counts()
    assert counts == {
        "train": int((train_labels == normal).sum()),
        "test": N,
        "test_normal": int((test_labels == normal).sum()),
        "test_anomalous": int((test_labels != normal).sum()),
    }
    assert data.train_images.dtype == np.uint8 and data.train_images.shape[-1] == 3
    assert data.class_names == registry.class_names(name)
    assert name in data.summary() and str(counts["train"]) in data.summary()


def test_cifar100_uses_the_20_superclasses_not_the_100_labels(tmp_path):
    with tfds.testing.mock_data(num_examples=N):
        data = load_one_class("cifar100", 0, data_dir=str(tmp_path))
        fine = np.asarray([ex["label"] for ex in direct("cifar100", "test")])
    assert data.test_classes.max() < 20 <= fine.max()
    assert registry.num_classes("cifar100") == 20


def test_fashion_mnist_grayscale_is_replicated_to_three_channels(tmp_path):
    with tfds.testing.mock_data(num_examples=8):
        normal = int(direct("fashion_mnist", "train")[0]["label"])
        data = load_one_class("fashion_mnist", normal, data_dir=str(tmp_path))
    assert data.test_images.shape == (8, 28, 28, 3)
    np.testing.assert_array_equal(data.test_images[..., 0], data.test_images[..., 2])


def test_cats_vs_dogs_seeded_split_and_resize(tmp_path):
    sizes = (12, 9)
    with tfds.testing.mock_data(num_examples=N):
        data = load_one_class("cats_vs_dogs", 1, data_dir=str(tmp_path), split_sizes=sizes)
        again = load_one_class("cats_vs_dogs", 1, data_dir=str(tmp_path), split_sizes=sizes)
        records = direct("cats_vs_dogs", "train")
    labels = np.asarray([ex["label"] for ex in records])
    names = [ex["image/filename"] for ex in records]
    train_idx, test_idx = cats_vs_dogs_split(
        labels, names, train_per_class=sizes[0], test_per_class=sizes[1]
    )
    assert not set(train_idx) & set(test_idx)
    per_class = [int((labels == c).sum()) for c in (0, 1)]
    assert data.counts()["train"] == min(sizes[0], max(0, per_class[1] - sizes[1]))
    assert data.counts()["test_normal"] == min(sizes[1], per_class[1])
    assert data.counts()["test_anomalous"] == min(sizes[1], per_class[0])
    np.testing.assert_array_equal(data.test_classes, labels[test_idx])
    # mock images have random sizes (5..50 px): all stored at the default 256 square
    assert data.train_images.shape[1:] == (256, 256, 3)
    np.testing.assert_array_equal(data.train_images, again.train_images)  # deterministic
    with tfds.testing.mock_data(num_examples=20):
        small = load_one_class("cats_vs_dogs", 0, image_size=40, split_sizes=(5, 3))
    assert small.test_images.shape[1:] == (40, 40, 3)


def test_cats_vs_dogs_split_depends_on_file_names_not_record_order():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    names = [f"PetImages/{'Cat' if y == 0 else 'Dog'}/{i}.jpg" for i, y in enumerate(labels)]
    train, test = cats_vs_dogs_split(labels, names, train_per_class=100, test_per_class=40)
    perm = rng.permutation(300)
    train_p, test_p = cats_vs_dogs_split(
        labels[perm], [names[i] for i in perm], train_per_class=100, test_per_class=40
    )
    assert {names[i] for i in train} == {names[perm[i]] for i in train_p}
    assert {names[i] for i in test} == {names[perm[i]] for i in test_p}
    for c in (0, 1):
        assert (labels[test] == c).sum() == 40
        assert (labels[train] == c).sum() == min(100, (labels == c).sum() - 40)
    other_seed = cats_vs_dogs_split(labels, names, train_per_class=100, test_per_class=40, seed=1)
    assert set(other_seed[1]) != set(test)


def test_class_names_agree_with_tfds_where_tfds_knows_them(tmp_path):
    for name in ("fashion_mnist", "cats_vs_dogs"):
        spec = tfds_sources.SPECS[name]
        features = tfds.builder(name, data_dir=str(tmp_path)).info.features
        assert list(features[spec.label_key].names) == registry.class_names(name)
    # CIFAR names come with the downloaded files; CIFAR-100's coarse names are alphabetical.
    assert registry.class_names("cifar100") == sorted(registry.class_names("cifar100"))
    assert len(set(registry.class_names("cifar100"))) == 20
    assert registry.class_names("cifar10")[0] == "airplane"


def test_offline_without_data_names_what_to_download_and_where(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_one_class("cifar10", 0, data_dir=str(tmp_path), download=False)
    message = str(err.value)
    assert "cifar-10-binary.tar.gz" in message
    assert str(tmp_path / "downloads" / "manual") in message
    assert "\n" not in message
    manual = tmp_path / "my_manual"
    with pytest.raises(FileNotFoundError, match="my_manual"):
        load_one_class(
            "fashion_mnist", 0, data_dir=str(tmp_path), download=False, manual_dir=str(manual)
        )


def test_missing_tensorflow_is_one_sentence(tmp_path, monkeypatch, caplog):
    from msad_jax.errors import MissingDependencyError

    monkeypatch.setattr(tfds_sources, "tensorflow_available", lambda: False)
    with pytest.raises(MissingDependencyError, match=r"pip install 'msad_jax\[tf\]'") as err:
        load_one_class("cifar10", 0, data_dir=str(tmp_path))
    message = str(err.value)
    assert "\n" not in message
    # Where to put the data instead: the manual folder, or a prepared copy.
    assert str(tmp_path / "downloads" / "manual") in message and "'cifar10/" in message
    assert not [r for r in caplog.records if "Variant folder" in r.getMessage()]


def test_failed_download_gives_the_offline_instructions(tmp_path, monkeypatch):
    monkeypatch.setattr(tfds_sources, "tensorflow_available", lambda: True)

    calls = []

    def offline(self, *args, **kwargs):
        calls.append(kwargs)
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    manual = str(tmp_path / "manual")
    with pytest.raises(FileNotFoundError, match="kagglecatsanddogs"):
        load_one_class("cats_vs_dogs", 0, data_dir=str(tmp_path), manual_dir=manual)
    assert calls[0]["file_format"] == "array_record"  # random access without TensorFlow
    assert str(calls[0]["download_config"].manual_dir) == manual


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="valid names: cifar10, cifar100") as err:
        load_one_class("imagenet", 0)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="out of range"):
        load_one_class("cifar10", 10)
