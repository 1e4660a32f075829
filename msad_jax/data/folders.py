"""Your own images: a directory or a .zip file (read without extracting) in one of two layouts.

Split layout (a zip whose files sit in one top folder is entered automatically)::

    ROOT/train/<class>/**/<image>      normal training images, one folder per class
    ROOT/test/<class>/**/<image>       label 0 if <class> is the normal class, else 1

Any train class can be the normal class; test folders that are not train classes (defect types)
are always anomalies (e.g. ``train/good/``, ``test/good/``, ``test/<defect>/``).

Category layout (MVTec AD)::

    ROOT/<category>/train/good/<image>
    ROOT/<category>/test/<good|defect>/<image>     (other folders are ignored)

Each category is one problem; ``good`` is normal. Names sort naturally (``class2 < class10``);
non-image, hidden and ``__MACOSX`` files are ignored; an undecodable image raises, naming it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import zipfile
from collections.abc import Callable, Iterator

import numpy as np

from msad_jax.data.images import decode_all
from msad_jax.errors import InputError, MissingInputError

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
NORMAL_FOLDER_NAMES = ("good", "normal")


def natural_key(text: str) -> list:
    """Sort key comparing digit runs as numbers: 'img2' < 'img10'."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def _is_image(path: str) -> bool:
    parts = path.split("/")
    if any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return False
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


@dataclasses.dataclass(frozen=True)
class FileTree:
    """Image files under a root: relative POSIX paths plus readers of their bytes and sizes."""

    root: str
    files: tuple[str, ...]
    read: Callable[[str], bytes]
    size: Callable[[str], int]

    def subtree(self, prefix: str) -> FileTree:
        """The files under ``prefix/``, with paths relative to it."""
        cut = len(prefix) + 1
        files = tuple(f[cut:] for f in self.files if f.startswith(prefix + "/"))
        read, size = self.read, self.size
        return FileTree(
            f"{self.root}/{prefix}",
            files,
            lambda p: read(f"{prefix}/{p}"),
            lambda p: size(f"{prefix}/{p}"),
        )


@contextlib.contextmanager
def open_tree(path: str | os.PathLike) -> Iterator[FileTree]:
    """Opens a directory or a .zip file as a :class:`FileTree` (the zip stays open inside)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingInputError(f"Image folder or zip {path!r} does not exist.")
    if os.path.isdir(path):
        files = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = os.path.relpath(dirpath, path).replace(os.sep, "/")
            for name in filenames:
                files.append(name if rel == "." else f"{rel}/{name}")

        def read_file(rel: str) -> bytes:
            with open(os.path.join(path, *rel.split("/")), "rb") as handle:
                return handle.read()

        def file_size(rel: str) -> int:
            return os.path.getsize(os.path.join(path, *rel.split("/")))

        yield FileTree(path, tuple(f for f in files if _is_image(f)), read_file, file_size)
        return
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path!r} is neither a directory nor a zip file.")
    with zipfile.ZipFile(path) as archive:
        names = tuple(n for n in archive.namelist() if not n.endswith("/") and _is_image(n))
        yield FileTree(path, names, archive.read, lambda name: archive.getinfo(name).file_size)


def file_list_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of the sorted image files under ``path`` (directory or zip) and their byte sizes."""
    digest = hashlib.sha256()
    with open_tree(path) as tree:
        for name in sorted(tree.files):
            digest.update(f"{name}\t{tree.size(name)}\n".encode())
    return digest.hexdigest()


def _top_dirs(files: tuple[str, ...]) -> set[str]:
    return {f.split("/", 1)[0] for f in files if "/" in f}


def _has_split_layout(tree: FileTree) -> bool:
    return any(f.startswith("train/") for f in tree.files)


def _categories(tree: FileTree) -> list[str]:
    return sorted(
        {f.split("/", 1)[0] for f in tree.files if f.split("/")[1:2] == ["train"]},
        key=natural_key,
    )


def resolve_root(tree: FileTree) -> FileTree:
    """Enters a single top folder (common in zip files) while ROOT has no train/ folder."""
    while not _has_split_layout(tree):
        tops = _top_dirs(tree.files)
        if len(tops) != 1 or any("/" not in f for f in tree.files):
            break
        tree = tree.subtree(tops.pop())
    return tree


def _layout_error(tree: FileTree) -> InputError:
    return InputError(
        f"No images in a known layout under {tree.root!r}: expected ROOT/train/<class>/ and "
        "ROOT/test/<class>/ (class-per-folder, train/good + test/<defect>, or train/normal + "
        "test/normal + test/anomalous) or MVTec AD's ROOT/<category>/train/good/ and "
        "ROOT/<category>/test/<defect|good>/."
    )


def _classes_under(tree: FileTree, split: str) -> list[str]:
    names = {parts[1] for f in tree.files if len(parts := f.split("/")) >= 3 and parts[0] == split}
    return sorted(names, key=natural_key)


def folder_class_names(tree: FileTree) -> list[str]:
    """Names of the possible normal classes: train class folders, or MVTec categories."""
    tree = resolve_root(tree)
    if _has_split_layout(tree):
        classes = _classes_under(tree, "train")
        if classes:
            return classes
    categories = _categories(tree)
    if categories:
        return categories
    raise _layout_error(tree)


@dataclasses.dataclass(frozen=True)
class FolderSplit:
    """File lists of one one-class problem read from a folder."""

    root: str
    train_files: list[str]
    test_files: list[str]
    test_classes: np.ndarray
    class_names: list[str]
    normal_class: int
    read: Callable[[str], bytes] = dataclasses.field(repr=False, compare=False)


def _split_problem(tree: FileTree, normal: str) -> FolderSplit:
    train_classes = _classes_under(tree, "train")
    test_classes = _classes_under(tree, "test")
    if normal not in train_classes:
        raise InputError(
            f"Normal class {normal!r} has no folder {tree.root}/train/{normal}/; "
            f"train classes: {train_classes}."
        )
    names = train_classes + [c for c in test_classes if c not in train_classes]
    index = {c: i for i, c in enumerate(names)}
    train = sorted(
        (f for f in tree.files if f.split("/")[:2] == ["train", normal] and f.count("/") >= 2),
        key=natural_key,
    )
    test = sorted(
        (f for f in tree.files if f.startswith("test/") and f.count("/") >= 2),
        key=lambda f: (index[f.split("/")[1]], natural_key(f)),
    )
    if not test:
        raise InputError(f"No test images under {tree.root}/test/<class>/.")
    classes = np.asarray([index[f.split("/")[1]] for f in test], dtype=np.int32)
    return FolderSplit(tree.root, train, test, classes, names, index[normal], tree.read)


def folder_split(tree: FileTree, normal_class: int | str) -> FolderSplit:
    """Chooses the files of one one-class problem (see the module doc for the layouts).

    Args:
      tree: the opened folder or zip.
      normal_class: index into :func:`folder_class_names`, or that name.

    Returns:
      The train files (normal class only), all test files and their class ids.
    """
    tree = resolve_root(tree)
    problems = folder_class_names(tree)
    if isinstance(normal_class, str):
        if normal_class not in problems:
            raise InputError(f"normal_class {normal_class!r} not in {problems}.")
        name = normal_class
    else:
        if not 0 <= int(normal_class) < len(problems):
            raise InputError(
                f"normal_class={normal_class} out of range: {len(problems)} classes {problems}."
            )
        name = problems[int(normal_class)]
    if _has_split_layout(tree) and _classes_under(tree, "train"):
        return _split_problem(tree, name)
    category = tree.subtree(name)
    train_classes = _classes_under(category, "train")
    normal = next((c for c in NORMAL_FOLDER_NAMES if c in train_classes), None)
    if normal is None:
        if len(train_classes) != 1:
            raise InputError(
                f"Category {name!r} needs one normal folder {category.root}/train/good/; "
                f"found {train_classes}."
            )
        normal = train_classes[0]
    return _split_problem(category, normal)


def load_folder(
    path: str | os.PathLike,
    normal_class: int | str,
    *,
    image_size: int | None = None,
    num_workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray, FolderSplit]:
    """Decodes one one-class problem from a directory or zip file.

    Args:
      path: directory or .zip file.
      normal_class: index or name of the normal class (or MVTec category).
      image_size: common square side; None: images larger than 256 (longer side), or all images when
        their sizes differ (train and test together), become 256x256 as they are decoded, and images
        that all share one size up to 256 keep it.
      num_workers: decoding threads.

    Returns:
      ``(train_images, test_images, split)`` with uint8 ``[N, S, S, 3]`` arrays.
    """
    with open_tree(path) as tree:
        split = folder_split(tree, normal_class)
        images = decode_all(
            split.train_files + split.test_files,
            split.read,
            image_size=image_size,
            num_workers=num_workers,
        )
    n_train = len(split.train_files)
    return images[:n_train], images[n_train:], split
