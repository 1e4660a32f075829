"""One-class protocols (SPEC §8): a normal class's training images and a labelled test split.

``load_one_class(dataset, normal_class, ...)`` picks the source by name:

==================  ===========================================================================
``cifar10``         TFDS; train on the class's 5000 images; test on all 10000 (1000 normal).
``cifar100``        TFDS; the 20 coarse superclasses are the classes; 2500 train; all 10000 test.
``fashion_mnist``   TFDS; grayscale replicated to 3 channels; 6000 train; all 10000 test.
``cats_vs_dogs``    TFDS's single 'train' split cut per class into a fixed seeded test part
                    (2500) and train part (up to 10000), see ``cats_vs_dogs_split``.
                    Images are resized to ``image_size`` (default 256, shorter side + crop).
``digits``          scikit-learn's 8x8 digits (no download), a fixed seeded stratified split
                    (``msad_jax.data.digits``); about 120 train; all 599 test (about 60 normal).
``folder``          a directory or .zip file of images (``msad_jax.data.folders`` layouts).
``arrays``          in-memory labelled arrays (:class:`LabelledArrays`).
==================  ===========================================================================

Test label 1 = anomaly (every class other than the normal one).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from msad_jax.data import digits, folders, tfds_sources
from msad_jax.data.images import DEFAULT_IMAGE_SIZE, stack_images
from msad_jax.errors import InputError

DATASETS = ("cifar10", "cifar100", "fashion_mnist", "cats_vs_dogs", "digits", "folder", "arrays")


@dataclasses.dataclass(frozen=True)
class OneClassData:
    """One one-class anomaly-detection problem.

    Attributes:
      train_images: uint8 ``[N, H, W, 3]``, normal training images only.
      test_images: uint8 ``[M, H, W, 3]``.
      test_labels: int32 ``[M]``, 1 = anomaly, 0 = normal.
      test_classes: int32 ``[M]``, original class id of each test image (index into
        ``class_names``).
      class_names: names of the class ids.
      normal_class: id of the normal class.
      name: dataset name (with the path for folders).
    """

    train_images: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    test_classes: np.ndarray
    class_names: list[str]
    normal_class: int
    name: str

    def __post_init__(self) -> None:
        for field in ("train_images", "test_images"):
            array = getattr(self, field)
            if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
                raise InputError(
                    f"OneClassData.{field} must be uint8 [N, H, W, 3], "
                    f"got {array.dtype} {array.shape}."
                )
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise InputError(
                f"Train and test images differ in size: {self.train_images.shape[1:]} vs "
                f"{self.test_images.shape[1:]}."
            )
        m = len(self.test_images)
        if self.test_labels.shape != (m,) or self.test_classes.shape != (m,):
            raise InputError(f"test_labels and test_classes must have shape ({m},).")
        if not np.isin(self.test_labels, (0, 1)).all():
            raise InputError("test_labels must be 0 (normal) or 1 (anomaly).")
        if len(self.train_images) == 0:
            raise InputError(f"No training images for normal class {self.normal_class}.")

    @property
    def normal_class_name(self) -> str:
        """Name of the normal class."""
        return self.class_names[self.normal_class]

    def counts(self) -> dict[str, int]:
        """Numbers of images: train, test, test normal, test anomalous."""
        anomalous = int(np.sum(self.test_labels))
        return {
            "train": len(self.train_images),
            "test": len(self.test_images),
            "test_normal": len(self.test_images) - anomalous,
            "test_anomalous": anomalous,
        }

    def summary(self) -> str:
        """One line describing the problem and its counts."""
        c = self.counts()
        size = "x".join(str(s) for s in self.train_images.shape[1:3])
        return (
            f"{self.name}: normal class {self.normal_class} ({self.normal_class_name}), "
            f"{c['train']} train, {c['test']} test ({c['test_normal']} normal, "
            f"{c['test_anomalous']} anomalous), images {size}"
        )


@dataclasses.dataclass(frozen=True)
class LabelledArrays:
    """In-memory labelled data for the 'arrays' source (notebooks, tests).

    Attributes:
      train_images: uint8 ``[N, H, W, C]`` with C in {1, 3, 4} (or ``[N, H, W]``).
      train_labels: int class ids ``[N]``.
      test_images: uint8 like ``train_images``.
      test_labels: int class ids ``[M]``.
      class_names: optional names; default ``str(i)`` for ``0..max id``.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...] | None = None

    def names(self) -> list[str]:
        """Class names (given, or the ids as strings)."""
        if self.class_names is not None:
            return list(self.class_names)
        top = max(
            int(np.max(self.train_labels, initial=0)), int(np.max(self.test_labels, initial=0))
        )
        return [str(i) for i in range(top + 1)]


def _unknown(dataset: str) -> InputError:
    return InputError(f"Unknown dataset {dataset!r}; valid names: {', '.join(DATASETS)}.")


def class_names(
    dataset: str, *, path: str | os.PathLike | None = None, arrays: LabelledArrays | None = None
) -> list[str]:
    """Names of the classes that can be the normal class (what ``normal_class`` indexes).

    For 'folder' these are the train class folders, or the MVTec categories; ``path`` is needed.
    For 'arrays', ``arrays`` is needed.
    """
    if dataset in tfds_sources.SPECS:
        return list(tfds_sources.SPECS[dataset].class_names)
    if dataset == "digits":
        return list(digits.CLASS_NAMES)
    if dataset == "folder":
        if path is None:
            raise InputError("dataset='folder' needs path=<directory or .zip>.")
        with folders.open_tree(path) as tree:
            return folders.folder_class_names(tree)
    if dataset == "arrays":
        if arrays is None:
            raise InputError("dataset='arrays' needs arrays=LabelledArrays(...).")
        return arrays.names()
    raise _unknown(dataset)


def num_classes(
    dataset: str, *, path: str | os.PathLike | None = None, arrays: LabelledArrays | None = None
) -> int:
    """Number of possible normal classes (for ``normal_class='all'`` loops)."""
    return len(class_names(dataset, path=path, arrays=arrays))


def _class_index(normal_class: int | str, names: list[str]) -> int:
    if normal_class == "all" and "all" not in names:
        raise InputError(
            "normal_class='all' means one run per class: call load_one_class for each index in "
            "range(num_classes(dataset))."
        )
    if isinstance(normal_class, str):
        if normal_class not in names:
            raise InputError(f"normal_class {normal_class!r} is not one of {names}.")
        return names.index(normal_class)
    index = int(normal_class)
    if not 0 <= index < len(names):
        raise InputError(f"normal_class={normal_class} out of range: classes 0..{len(names) - 1}.")
    return index


def _rgb(images: np.ndarray, what: str) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise InputError(f"{what} must be uint8 (0..255), got {images.dtype}.")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise InputError(f"{what} must be [N, H, W] or [N, H, W, 1|3|4], got {images.shape}.")
    if images.shape[-1] == 1:
        return np.repeat(images, 3, axis=-1)
    return images[..., :3]


def one_class_from_labelled(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    names: list[str],
    normal_class: int | str,
    name: str,
    *,
    image_size: int | None = None,
) -> OneClassData:
    """One-vs-rest split of labelled data: normal training images, all test images labelled.

    Args:
      train_images: uint8 images (any of the shapes ``LabelledArrays`` accepts).
      train_labels: class id per training image.
      test_images: uint8 test images.
      test_labels: class id per test image.
      names: class names.
      normal_class: index or name of the normal class.
      name: dataset name for reports.
      image_size: resize to this square side (``msad_jax.data.images.fit_square``).

    Returns:
      The :class:`OneClassData`.
    """
    index = _class_index(normal_class, names)
    train_labels = np.asarray(train_labels).reshape(-1)
    test_labels = np.asarray(test_labels).reshape(-1)
    if len(train_labels) != len(train_images) or len(test_labels) != len(test_images):
        raise InputError("Each image needs exactly one label (lengths differ).")
    train = _rgb(train_images, "train_images")[train_labels == index]
    test = _rgb(test_images, "test_images")
    if image_size is not None or train.shape[1:] != test.shape[1:]:
        side = image_size or DEFAULT_IMAGE_SIZE
        train = stack_images(list(train), side)
        test = stack_images(list(test), side)
    return OneClassData(
        train_images=train,
        test_images=test,
        test_labels=(test_labels != index).astype(np.int32),
        test_classes=test_labels.astype(np.int32),
        class_names=list(names),
        normal_class=index,
        name=name,
    )


def _load_tfds(
    dataset: str,
    normal_class: int | str,
    *,
    data_dir: str | None,
    image_size: int | None,
    download: bool,
    manual_dir: str | None,
    split_sizes: tuple[int, int],
    num_workers: int | None,
) -> OneClassData:
    spec = tfds_sources.SPECS[dataset]
    names = list(spec.class_names)
    index = _class_index(normal_class, names)
    opened = {
        split: tfds_sources.open_tfds(
            spec.tfds_name, split, data_dir=data_dir, download=download, manual_dir=manual_dir
        )
        for split in spec.splits
    }
    read = dict(label_key=spec.label_key, num_workers=num_workers)
    if dataset == "cats_vs_dogs":
        source = opened["train"]
        everything = np.arange(len(source))
        _, labels, fnames = tfds_sources.read_examples(
            source, everything, image_size=None, with_images=False, **read
        )
        train_idx, test_idx = tfds_sources.cats_vs_dogs_split(
            labels, fnames, train_per_class=split_sizes[0], test_per_class=split_sizes[1]
        )
        train_idx = train_idx[labels[train_idx] == index]
        side = image_size or DEFAULT_IMAGE_SIZE
        train, train_labels, _ = tfds_sources.read_examples(
            source, train_idx, image_size=side, **read
        )
        test, test_labels, _ = tfds_sources.read_examples(source, test_idx, image_size=side, **read)
    else:
        train, train_labels, _ = tfds_sources.read_examples(
            opened["train"], np.arange(len(opened["train"])), image_size=image_size, **read
        )
        test, test_labels, _ = tfds_sources.read_examples(
            opened["test"], np.arange(len(opened["test"])), image_size=image_size, **read
        )
    return one_class_from_labelled(
        train, train_labels, test, test_labels, names, index, dataset, image_size=image_size
    )


def load_one_class(
    dataset: str,
    normal_class: int | str,
    *,
    data_dir: str | None = None,
    image_size: int | None = None,
    path: str | os.PathLike | None = None,
    arrays: LabelledArrays | None = None,
    download: bool = True,
    manual_dir: str | None = None,
    split_sizes: tuple[int, int] = (10000, 2500),
    num_workers: int | None = None,
) -> OneClassData:
    """Loads one one-class problem (SPEC §8) from the named source.

    Args:
      dataset: one of ``DATASETS``.
      normal_class: index (or name) of the normal class; see :func:`class_names`.
      data_dir: TFDS data directory (TFDS datasets).
      image_size: resize images to this square side (shorter side + center crop, Pillow
        bilinear). None: arrays and TFDS images keep their native size when all sizes agree
        (else 256); folders follow the rule of ``msad_jax.data.images`` (images larger than 256,
        or of mixed sizes, become 256x256 as they are decoded; a common size up to 256 is kept).
      path: directory or .zip file ('folder').
      arrays: labelled arrays ('arrays').
      download: let TFDS prepare a missing dataset (needs TensorFlow and network, or the
        source files in ``manual_dir``).
      manual_dir: TFDS manual download directory.
      split_sizes: CatsVsDogs ``(train_per_class, test_per_class)``.
      num_workers: decoding threads.

    Returns:
      The :class:`OneClassData`.
    """
    if dataset in tfds_sources.SPECS:
        return _load_tfds(
            dataset,
            normal_class,
            data_dir=data_dir,
            image_size=image_size,
            download=download,
            manual_dir=manual_dir,
            split_sizes=split_sizes,
            num_workers=num_workers,
        )
    if dataset == "digits":
        return one_class_from_labelled(
            *digits.load_digits_arrays(),
            list(digits.CLASS_NAMES),
            normal_class,
            "digits",
            image_size=image_size,
        )
    if dataset == "folder":
        if path is None:
            raise InputError("dataset='folder' needs path=<directory or .zip>.")
        train, test, split = folders.load_folder(
            path, normal_class, image_size=image_size, num_workers=num_workers
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
    if dataset == "arrays":
        if arrays is None:
            raise InputError("dataset='arrays' needs arrays=LabelledArrays(...).")
        return one_class_from_labelled(
            arrays.train_images,
            arrays.train_labels,
            arrays.test_images,
            arrays.test_labels,
            arrays.names(),
            normal_class,
            "arrays",
            image_size=image_size,
        )
    raise _unknown(dataset)
