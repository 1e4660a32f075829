"""The one-class protocol (SPEC §8): a normal class's training images and a labelled test split."""

from __future__ import annotations

import dataclasses

import numpy as np

from msad_jax.data.images import DEFAULT_IMAGE_SIZE, stack_images
from msad_jax.errors import InputError


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


def class_index(normal_class: int | str, names: list[str]) -> int:
    """The index of ``normal_class`` (an index or a name) in ``names``; InputError if none."""
    if normal_class == "all" and "all" not in names:
        raise InputError(
            "normal_class='all' means one run per class: load each index in "
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
    """
    index = class_index(normal_class, names)
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
