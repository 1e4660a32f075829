"""The exact CIFAR-10 pixels of ``lossless_reference_subsets.npz`` as a lossless image folder.

The file (described in ``../shared/data/README.md``) holds the original CIFAR-10 pixels of the
official training images 0..3999 and test images 0..999. The benchmarks feed them to the product
path (``msad_jax.train.train_and_evaluate`` with ``dataset='folder'``) through a zip of PNG files
written here, losslessly, in the folder layout ``train/<class>/<index>.png`` and
``test/<class>/<index>.png`` (``<index>``: the official index, 4 digits; class folders named in
the official order, which is also their alphabetical order). :func:`check_one_class` verifies that
what the loader returns is bit for bit the arrays of the npz file.

Why a file copy rather than a new in-memory data source: the benchmark then measures exactly what
users run on their own images (``dataset='folder'``: zip reading, PNG decoding, class order,
one-vs-rest labels), needs no new library code or config key, and stays lossless (checked on every
run); the price is a 12 MB zip under ``runs/`` written in about 3 s.

Per normal class: its 366-422 training images among the first 4000, and all 1000 test images
(86-112 normal): not the full protocol of SPEC §8 (5000 train, 10000 test per class).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pathlib
import zipfile

import numpy as np
from PIL import Image

CLASS_NAMES = (
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
NPZ_SHA256 = "ba1fb4688d53bca4112d58fd9b4026c5ec4aa96ab1bff2e36e2e9e94c6d7729d"
DATA_LABEL = "CIFAR-10 (exact pixels: train 0..3999, test 0..999)"
_ZIP_DATE = (2020, 1, 1, 0, 0, 0)  # fixed member timestamps: the same arrays give the same zip


@dataclasses.dataclass(frozen=True)
class ExactSubsets:
    """The arrays of the npz file.

    Attributes:
      train_images: uint8 ``[N, 32, 32, 3]``, official training indices ``0..N-1``.
      train_labels: int ``[N]``.
      test_images: uint8 ``[M, 32, 32, 3]``, official test indices ``0..M-1``.
      test_labels: int ``[M]``.
      sha256: of the npz file.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    sha256: str


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_subsets(path: str | os.PathLike, *, check_hash: bool = True) -> ExactSubsets:
    """Reads the npz file (no pickled objects), checking its hash unless told not to.

    Raises:
      SystemExit: one line naming the problem when the file is missing or differs.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise SystemExit(
            f"error: {path} not found; pass --data <lossless_reference_subsets.npz> "
            "(see ../shared/data/README.md)."
        )
    sha = file_sha256(path)
    if check_hash and sha != NPZ_SHA256:
        raise SystemExit(
            f"error: {path} has sha256 {sha}, not {NPZ_SHA256}; it is not the documented "
            "lossless_reference_subsets.npz."
        )
    with np.load(path, allow_pickle=False) as data:
        return ExactSubsets(
            train_images=data["train_x_first4000"],
            train_labels=data["train_y_first4000"].astype(np.int64),
            test_images=data["test_x_first1000"],
            test_labels=data["test_y_first1000"].astype(np.int64),
            sha256=sha,
        )


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def member_name(split: str, label: int, index: int) -> str:
    """Path of one image inside the zip."""
    return f"{split}/{CLASS_NAMES[label]}/{index:04d}.png"


def write_png_zip(subsets: ExactSubsets, path: str | os.PathLike) -> pathlib.Path:
    """Writes every image as a PNG into a zip (atomically: a temporary file is renamed).

    Args:
      subsets: the arrays.
      path: the zip to write.

    Returns:
      The path.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED) as archive:
        for split, images, labels in (
            ("train", subsets.train_images, subsets.train_labels),
            ("test", subsets.test_images, subsets.test_labels),
        ):
            for index, (image, label) in enumerate(zip(images, labels, strict=True)):
                info = zipfile.ZipInfo(member_name(split, int(label), index), _ZIP_DATE)
                archive.writestr(info, _png(image))
    os.replace(partial, path)
    return path


def ensure_png_zip(subsets: ExactSubsets, path: str | os.PathLike) -> pathlib.Path:
    """The zip at ``path``, written if missing or if any image in it differs from the arrays."""
    path = pathlib.Path(path)
    if path.is_file() and zip_matches(subsets, path):
        return path
    return write_png_zip(subsets, path)


def zip_matches(subsets: ExactSubsets, path: str | os.PathLike) -> bool:
    """Whether the zip holds exactly the arrays' images under the expected names."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            for split, images, labels in (
                ("train", subsets.train_images, subsets.train_labels),
                ("test", subsets.test_images, subsets.test_labels),
            ):
                for index, (image, label) in enumerate(zip(images, labels, strict=True)):
                    name = member_name(split, int(label), index)
                    if name not in names:
                        return False
                    with Image.open(io.BytesIO(archive.read(name))) as decoded:
                        if not np.array_equal(np.asarray(decoded.convert("RGB")), image):
                            return False
                    names.discard(name)
            return not names
    except (zipfile.BadZipFile, OSError):
        return False


def one_class_arrays(
    subsets: ExactSubsets, normal_class: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(train_images, test_images, test_classes)`` of a class in the folder loader's order.

    The loader lists test images by class folder, then by file name (the official index).
    """
    train = subsets.train_images[subsets.train_labels == normal_class]
    order = np.lexsort((np.arange(len(subsets.test_labels)), subsets.test_labels))
    return train, subsets.test_images[order], subsets.test_labels[order].astype(np.int32)


def check_one_class(data, subsets: ExactSubsets, normal_class: int) -> None:
    """Raises AssertionError unless ``data`` (a ``OneClassData``) is exactly the npz's pixels."""
    train, test, classes = one_class_arrays(subsets, normal_class)
    if not (
        np.array_equal(data.train_images, train)
        and np.array_equal(data.test_images, test)
        and np.array_equal(data.test_classes, classes)
        and np.array_equal(data.test_labels, (classes != normal_class).astype(np.int32))
    ):
        raise AssertionError(
            f"The loaded images of class {normal_class} differ from the npz file's pixels."
        )
