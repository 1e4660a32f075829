"""Data sources by name: their classes, their one-class problems, what decides their images."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from msad_jax.data import digits, folders, synthetic, tfds_sources
from msad_jax.data.images import DEFAULT_IMAGE_SIZE
from msad_jax.data.protocols import (
    LabelledArrays,
    OneClassData,
    class_index,
    one_class_from_labelled,
)
from msad_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class DataOptions:
    """Where and how to read a source's images; each source uses the options it needs.

    Attributes:
      data_dir: TFDS data directory (TFDS sources; None: TFDS's default).
      path: directory or .zip file of images ('folder').
      arrays: labelled arrays ('arrays').
      image_size: resize images to this square side (shorter side + center crop, Pillow bilinear).
      download: let TFDS prepare a missing dataset (needs TensorFlow and network, or the source
        files in ``manual_dir``).
      manual_dir: TFDS manual download directory.
      split_sizes: CatsVsDogs ``(train_per_class, test_per_class)``.
      num_workers: decoding threads.
      synthetic_size: side of the synthetic images.
      synthetic_train: synthetic training images per class.
      synthetic_test: synthetic test images per class.
      seed: seed of the synthetic images.
    """

    data_dir: str | None = None
    path: str | os.PathLike | None = None
    arrays: LabelledArrays | None = None
    image_size: int | None = None
    download: bool = True
    manual_dir: str | None = None
    split_sizes: tuple[int, int] = (10000, 2500)
    num_workers: int | None = None
    synthetic_size: int = 32
    synthetic_train: int = 200
    synthetic_test: int = 40
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What msad_jax knows about one source of images.

    Attributes:
      name: registry name.
      class_names: ``options -> names`` of the classes that can be the normal class.
      load: ``(normal class index or name, options) -> OneClassData``.
      identity: ``options -> {key: value}`` of what decides which images the source serves besides
        its name and ``image_size`` (a resumed run must agree on it).
    """

    name: str
    class_names: Callable[[DataOptions], list[str]]
    load: Callable[[int | str, DataOptions], OneClassData]
    identity: Callable[[DataOptions], dict[str, Any]] = lambda options: {}


def _tfds_identity(options: DataOptions) -> dict[str, Any]:
    return {"data_dir": os.path.abspath(options.data_dir) if options.data_dir else ""}


def _read_split(spec: tfds_sources.TfdsSpec, split: str, options: DataOptions):
    source = tfds_sources.open_tfds(
        spec.tfds_name,
        split,
        data_dir=options.data_dir,
        download=options.download,
        manual_dir=options.manual_dir,
    )
    read = functools.partial(
        tfds_sources.read_examples,
        source,
        label_key=spec.label_key,
        num_workers=options.num_workers,
    )
    return source, read


def _load_tfds(name: str, normal_class: int | str, options: DataOptions) -> OneClassData:
    """A TFDS dataset with a train and a test split."""
    spec = tfds_sources.SPECS[name]
    index = class_index(normal_class, list(spec.class_names))  # before any reading
    images, labels = {}, {}
    for split in ("train", "test"):
        source, read = _read_split(spec, split, options)
        images[split], labels[split], _ = read(
            np.arange(len(source)), image_size=options.image_size
        )
    return one_class_from_labelled(
        images["train"],
        labels["train"],
        images["test"],
        labels["test"],
        list(spec.class_names),
        index,
        name,
        image_size=options.image_size,
    )


def _load_cats_vs_dogs(normal_class: int | str, options: DataOptions) -> OneClassData:
    """CatsVsDogs: the fixed seeded split of its single TFDS split (``cats_vs_dogs_split``)."""
    spec = tfds_sources.SPECS["cats_vs_dogs"]
    index = class_index(normal_class, list(spec.class_names))  # before any reading
    source, read = _read_split(spec, "train", options)
    _, labels, names = read(np.arange(len(source)), image_size=None, with_images=False)
    train_per_class, test_per_class = options.split_sizes
    train_idx, test_idx = tfds_sources.cats_vs_dogs_split(
        labels, names, train_per_class=train_per_class, test_per_class=test_per_class
    )
    side = options.image_size or DEFAULT_IMAGE_SIZE
    train, train_labels, _ = read(train_idx[labels[train_idx] == index], image_size=side)
    test, test_labels, _ = read(test_idx, image_size=side)
    return one_class_from_labelled(
        train, train_labels, test, test_labels, list(spec.class_names), index, "cats_vs_dogs"
    )


def _load_arrays(normal_class: int | str, options: DataOptions) -> OneClassData:
    arrays = _arrays(options)
    return one_class_from_labelled(
        arrays.train_images,
        arrays.train_labels,
        arrays.test_images,
        arrays.test_labels,
        arrays.names(),
        normal_class,
        "arrays",
        image_size=options.image_size,
    )


def _arrays(options: DataOptions) -> LabelledArrays:
    if options.arrays is None:
        raise InputError(
            "dataset='arrays' needs arrays=LabelledArrays(...) (in-memory images; a config file "
            "cannot name it)."
        )
    return options.arrays


def _load_synthetic(normal_class: int | str, options: DataOptions) -> OneClassData:
    arrays = synthetic.synthetic_arrays(
        size=options.synthetic_size,
        train_per_class=options.synthetic_train,
        test_per_class=options.synthetic_test,
        seed=options.seed,
    )
    return _load_arrays(normal_class, dataclasses.replace(options, arrays=arrays))


def _synthetic_identity(options: DataOptions) -> dict[str, Any]:
    return {
        "synthetic_size": options.synthetic_size,
        "synthetic_train": options.synthetic_train,
        "synthetic_test": options.synthetic_test,
    }


def _load_digits(normal_class: int | str, options: DataOptions) -> OneClassData:
    return one_class_from_labelled(
        *digits.load_digits_arrays(),
        list(digits.CLASS_NAMES),
        normal_class,
        "digits",
        image_size=options.image_size,
    )


def _folder_path(options: DataOptions) -> str | os.PathLike:
    if options.path is None:
        raise InputError("dataset='folder' needs path=<directory or .zip>.")
    return options.path


def _folder_class_names(options: DataOptions) -> list[str]:
    with folders.open_tree(_folder_path(options)) as tree:
        return folders.folder_class_names(tree)


def _load_folder(normal_class: int | str, options: DataOptions) -> OneClassData:
    train, test, split = folders.load_folder(
        _folder_path(options),
        normal_class,
        image_size=options.image_size,
        num_workers=options.num_workers,
    )
    return OneClassData(
        train_images=train,
        test_images=test,
        test_labels=(split.test_classes != split.normal_class).astype(np.int32),
        test_classes=split.test_classes,
        class_names=split.class_names,
        normal_class=split.normal_class,
        name=f"folder:{split.root}",
    )


def _folder_identity(options: DataOptions) -> dict[str, Any]:
    path = _folder_path(options)
    return {"data_dir": os.path.abspath(path), "data_files": folders.file_list_fingerprint(path)}


def _fixed(names: tuple[str, ...]) -> Callable[[DataOptions], list[str]]:
    return lambda options: list(names)


DATASETS: dict[str, DatasetSpec] = {
    **{
        name: DatasetSpec(
            name,
            _fixed(tfds_sources.SPECS[name].class_names),
            functools.partial(_load_tfds, name),
            _tfds_identity,
        )
        for name in ("cifar10", "cifar100", "fashion_mnist")
    },
    "cats_vs_dogs": DatasetSpec(
        "cats_vs_dogs",
        _fixed(tfds_sources.SPECS["cats_vs_dogs"].class_names),
        _load_cats_vs_dogs,
        _tfds_identity,
    ),
    "digits": DatasetSpec("digits", _fixed(digits.CLASS_NAMES), _load_digits),
    "synthetic": DatasetSpec(
        "synthetic", _fixed(synthetic.CLASS_NAMES), _load_synthetic, _synthetic_identity
    ),
    "folder": DatasetSpec("folder", _folder_class_names, _load_folder, _folder_identity),
    "arrays": DatasetSpec("arrays", lambda options: _arrays(options).names(), _load_arrays),
}
"""Every source of images, by name."""


def dataset_spec(dataset: str) -> DatasetSpec:
    """The registry entry of ``dataset``; an unknown name lists the valid ones."""
    try:
        return DATASETS[dataset]
    except KeyError:
        raise InputError(
            f"Unknown dataset {dataset!r}; valid names: {', '.join(DATASETS)}."
        ) from None


def class_names(dataset: str, **options: Any) -> list[str]:
    """Names of the classes that can be the normal class (what ``normal_class`` indexes)."""
    return dataset_spec(dataset).class_names(DataOptions(**options))


def num_classes(dataset: str, **options: Any) -> int:
    """Number of possible normal classes (for ``normal_class='all'`` loops)."""
    return len(class_names(dataset, **options))


def load_one_class(dataset: str, normal_class: int | str, **options: Any) -> OneClassData:
    """Loads one one-class problem (SPEC §8) of ``dataset``.

    Args:
      dataset: a name of :data:`DATASETS`.
      normal_class: index (or name) of the normal class; see :func:`class_names`.
      **options: :class:`DataOptions` fields (e.g. ``data_dir``, ``path``, ``image_size``).
    """
    return dataset_spec(dataset).load(normal_class, DataOptions(**options))
