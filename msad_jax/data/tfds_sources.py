"""TFDS datasets read with random access (``array_record``), no TensorFlow needed to read.

Reading uses ``builder.as_data_source``. Preparing a dataset the first time needs TensorFlow
(``pip install 'msad_jax[tf]'``), or the source files in the manual directory (default
``<data_dir>/downloads/manual``) on a machine without internet.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from msad_jax.data.images import default_workers, fit_square
from msad_jax.errors import InputError, MissingDependencyError, MissingInputError


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
    """How a TFDS dataset maps onto the one-class protocols (SPEC §8)."""

    tfds_name: str
    label_key: str
    class_names: tuple[str, ...]


CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR100_SUPERCLASSES = (
    "aquatic_mammals",
    "fish",
    "flowers",
    "food_containers",
    "fruit_and_vegetables",
    "household_electrical_devices",
    "household_furniture",
    "insects",
    "large_carnivores",
    "large_man-made_outdoor_things",
    "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores",
    "medium_mammals",
    "non-insect_invertebrates",
    "people",
    "reptiles",
    "small_mammals",
    "trees",
    "vehicles_1",
    "vehicles_2",
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CATS_VS_DOGS_CLASSES = ("cat", "dog")

SPECS: dict[str, TfdsSpec] = {
    "cifar10": TfdsSpec("cifar10", "label", CIFAR10_CLASSES),
    "cifar100": TfdsSpec("cifar100", "coarse_label", CIFAR100_SUPERCLASSES),
    "fashion_mnist": TfdsSpec("fashion_mnist", "label", FASHION_MNIST_CLASSES),
    "cats_vs_dogs": TfdsSpec("cats_vs_dogs", "label", CATS_VS_DOGS_CLASSES),
}


def tensorflow_available() -> bool:
    """Whether TensorFlow (needed only to prepare a TFDS dataset) is importable."""
    return importlib.util.find_spec("tensorflow") is not None


def _offline_message(builder: Any, manual_dir: str) -> str:
    urls = sorted((builder.url_infos or {}).keys())
    files = ", ".join(urls) if urls else "the dataset's source files"
    return (
        f"TFDS dataset {builder.name!r} is not prepared in {builder.data_dir_root} and cannot be "
        f"downloaded here: download {files} into {manual_dir} (or copy a prepared "
        f"'{builder.name}/{builder.version}' folder in array_record format into "
        f"{builder.data_dir_root}) and run again."
    )


def _is_prepared(builder: Any) -> bool:
    """``builder.is_prepared()``, without TFDS's warning about a missing variant folder."""
    if not (builder.data_path / "dataset_info.json").exists():
        return False
    return builder.is_prepared()


def open_tfds(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    download: bool = True,
    manual_dir: str | None = None,
) -> Any:
    """Random-access data source of a TFDS split, preparing the dataset if needed.

    Args:
      name: TFDS name, e.g. 'cifar10'.
      split: split name, e.g. 'train'.
      data_dir: TFDS data directory (default: TFDS's own default).
      download: prepare (download + convert) the dataset when it is missing.
      manual_dir: where already-downloaded source files are looked for (default
        ``<data_dir>/downloads/manual``).

    Returns:
      A sequence of example dicts (numpy values).

    Raises:
      MissingInputError: not prepared and ``download`` is False, or the download failed.
      MissingDependencyError: preparation is needed and TensorFlow is missing.
      InputError: the dataset was prepared in a format without random access (TFRecord).
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    manual = manual_dir or str(builder.data_dir_root) + "/downloads/manual"
    if _is_prepared(builder):
        try:
            return builder.as_data_source(split=split)
        except NotImplementedError:
            raise InputError(
                f"TFDS dataset {name!r} in {builder.data_dir} was prepared as TFRecord, which has "
                "no random access: delete that folder (or use another data_dir) and prepare it "
                "again with file_format='array_record' (msad_jax does this by default)."
            ) from None
    try:  # tfds.testing.mock_data replaces as_data_source and serves unprepared datasets.
        return builder.as_data_source(split=split)
    except (NotImplementedError, ValueError, FileNotFoundError, KeyError):
        pass
    if not download:
        raise MissingInputError(_offline_message(builder, manual))
    if not tensorflow_available():
        raise MissingDependencyError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir_root}, and preparing it "
            "needs TensorFlow, which is not installed: pip install 'msad_jax[tf]' (then it is "
            f"downloaded, or read from {manual}), or copy a prepared '{name}/{builder.version}' "
            f"folder (array_record format) into {builder.data_dir_root}; reading a prepared "
            "dataset does not need TensorFlow."
        )
    try:
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(manual_dir=manual),
        )
    except OSError as err:  # requests' ConnectionError is an OSError too.
        raise MissingInputError(f"{_offline_message(builder, manual)} ({err})") from err
    return builder.as_data_source(split=split)


def _to_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.uint8)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image[..., :3]


def read_examples(
    source: Any,
    indices: np.ndarray,
    *,
    label_key: str,
    image_size: int | None,
    with_images: bool = True,
    num_workers: int | None = None,
) -> tuple[np.ndarray | None, np.ndarray, list[str]]:
    """Reads examples ``indices`` of a TFDS source.

    Args:
      source: from :func:`open_tfds`.
      indices: record indices to read, in output order.
      label_key: feature holding the class id.
      image_size: resize each image with ``fit_square`` (needed when sizes vary).
      with_images: False reads labels (and file names) only; images are still decoded by TFDS but
        dropped right away.
      num_workers: reader threads.

    Returns:
      ``(images uint8 [n, S, S, 3] or None, labels int64 [n], file names or '')``.
    """

    def read(i: int) -> tuple[np.ndarray | None, int, str]:
        example = source[int(i)]
        label = int(example[label_key])
        fname = example.get("image/filename", "")
        fname = fname.decode() if isinstance(fname, bytes) else str(fname)
        if not with_images:
            return None, label, fname
        image = _to_rgb(example["image"])
        if image_size is not None:
            image = fit_square(image, image_size)
        return image, label, fname

    workers = num_workers or default_workers()
    with ThreadPoolExecutor(workers) as pool:
        rows = list(pool.map(read, indices))
    labels = np.asarray([r[1] for r in rows], dtype=np.int64)
    names = [r[2] for r in rows]
    if not with_images:
        return None, labels, names
    images = [r[0] for r in rows]
    if not images:
        side = image_size or 32
        return np.zeros((0, side, side, 3), np.uint8), labels, names
    if len({im.shape for im in images}) > 1:
        raise InputError(
            "TFDS images have different sizes: pass image_size=... to resize them to one size."
        )
    return np.stack(images), labels, names


CATS_VS_DOGS_SEED = 20230207
"""Seed of the fixed CatsVsDogs split (numpy PCG64)."""


def cats_vs_dogs_split(
    labels: np.ndarray,
    filenames: list[str],
    *,
    train_per_class: int = 10000,
    test_per_class: int = 2500,
    seed: int = CATS_VS_DOGS_SEED,
) -> tuple[np.ndarray, np.ndarray]:
    """The fixed, seeded per-class train/test split of CatsVsDogs.

    Args:
      labels: class id per record.
      filenames: file name per record (may be empty strings).
      train_per_class: train images per class (at most).
      test_per_class: test images per class (at most).
      seed: split seed.

    Returns:
      ``(train_indices, test_indices)`` into the records, each sorted by class then draw.
    """
    labels = np.asarray(labels)
    train, test = [], []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        members = sorted(members.tolist(), key=lambda i: (filenames[i] if filenames else "", i))
        rng = np.random.Generator(np.random.PCG64(seed + int(cls)))
        drawn = np.asarray(members, dtype=np.int64)[rng.permutation(len(members))]
        test.append(drawn[:test_per_class])
        train.append(drawn[test_per_class : test_per_class + train_per_class])
    empty = np.zeros(0, np.int64)
    return (np.concatenate(train) if train else empty, np.concatenate(test) if test else empty)
