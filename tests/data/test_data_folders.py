"""Folder and zip sources on images written by the test (PNG, JPEG, gray, RGBA, odd sizes)."""

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torchvision.transforms as T
from PIL import Image

from msad_jax.data import class_names, fit_square, load_one_class, num_classes
from msad_jax.data.folders import folder_split, open_tree

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
CIFAR_ZIP = SHARED / "cifar10-jpeg.zip"
LOSSLESS = SHARED / "lossless_reference_subsets.npz"


def write(path: Path, array: np.ndarray, mode: str | None = None, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    image.save(path, format=fmt)


def rand(seed, height, width, channels=3):
    rng = np.random.default_rng(seed)
    shape = (height, width) if channels == 1 else (height, width, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def expected_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture
def class_tree(tmp_path):
    """train/{cat,dog}, test/{cat,dog,fox}: 16x16 PNGs, one JPEG, gray, RGBA and palette images."""
    root = tmp_path / "pets"
    for i in range(3):
        write(root / "train" / "cat" / f"img{i + 1}.png", rand(i, 16, 16))
    write(root / "train" / "cat" / "img10.png", rand(10, 16, 16, 1), mode="L")  # grayscale
    write(root / "train" / "dog" / "a.png", rand(20, 16, 16, 4))  # RGBA
    write(root / "train" / "dog" / "b.jpg", rand(21, 16, 16), fmt="JPEG")
    write(root / "test" / "cat" / "t1.png", rand(30, 16, 16))
    write(root / "test" / "dog" / "t2.png", rand(31, 16, 16), mode="P")  # palette
    write(root / "test" / "fox" / "t3.jpeg", rand(32, 16, 16), fmt="JPEG")
    (root / "test" / "fox" / "notes.txt").write_text("not an image")
    (root / "train" / "cat" / ".hidden.png").write_bytes(b"ignored")
    return root


def zip_dir(root: Path, target: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(target, "w") as archive:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                archive.write(path, prefix + path.relative_to(root).as_posix())
    return target


def test_class_per_folder_directory(class_tree):
    assert class_names("folder", path=class_tree) == ["cat", "dog"]
    assert num_classes("folder", path=class_tree) == 2
    data = load_one_class("folder", "cat", path=class_tree)
    # natural order: img1, img2, img3, img10
    files = [class_tree / "train" / "cat" / f"img{i}.png" for i in (1, 2, 3, 10)]
    np.testing.assert_array_equal(data.train_images, np.stack([expected_rgb(f) for f in files]))
    assert data.class_names == ["cat", "dog", "fox"]
    np.testing.assert_array_equal(data.test_classes, [0, 1, 2])
    np.testing.assert_array_equal(data.test_labels, [0, 1, 1])
    test_files = ["cat/t1.png", "dog/t2.png", "fox/t3.jpeg"]
    expected = np.stack([expected_rgb(class_tree / "test" / f) for f in test_files])
    np.testing.assert_array_equal(data.test_images, expected)
    dog = load_one_class("folder", 1, path=class_tree)
    assert dog.counts() == {"train": 2, "test": 3, "test_normal": 1, "test_anomalous": 2}
    np.testing.assert_array_equal(dog.train_images[0], expected_rgb(class_tree / "train/dog/a.png"))
    assert dog.train_images[0].shape == (16, 16, 3)  # RGBA -> RGB


def test_zip_with_a_top_folder_reads_the_same_arrays(class_tree, tmp_path):
    archive = zip_dir(class_tree, tmp_path / "pets.zip", prefix="pets/")
    from_dir = load_one_class("folder", "dog", path=class_tree)
    from_zip = load_one_class("folder", "dog", path=archive)
    np.testing.assert_array_equal(from_zip.train_images, from_dir.train_images)
    np.testing.assert_array_equal(from_zip.test_images, from_dir.test_images)
    np.testing.assert_array_equal(from_zip.test_labels, from_dir.test_labels)
    assert class_names("folder", path=archive) == ["cat", "dog"]


def test_odd_sizes_are_fitted_to_a_common_square(tmp_path):
    root = tmp_path / "odd"
    write(root / "train" / "normal" / "wide.png", rand(1, 23, 41))
    write(root / "train" / "normal" / "tall.jpg", rand(2, 37, 17), fmt="JPEG")
    write(root / "test" / "normal" / "n.png", rand(3, 30, 30, 1), mode="L")
    write(root / "test" / "anomalous" / "a.png", rand(4, 19, 25, 4))
    data = load_one_class("folder", 0, path=root)  # sizes differ: default 256
    assert data.train_images.shape == (2, 256, 256, 3)
    assert data.class_names == ["normal", "anomalous"]
    np.testing.assert_array_equal(data.test_labels, [0, 1])  # train classes first, then others
    oracle = T.Compose([T.Resize(256), T.CenterCrop(256)])
    wide = Image.open(root / "train" / "normal" / "wide.png").convert("RGB")
    np.testing.assert_array_equal(data.train_images[1], np.asarray(oracle(wide)))
    small = load_one_class("folder", "normal", path=root, image_size=24)
    assert small.test_images.shape == (2, 24, 24, 3)
    np.testing.assert_array_equal(small.train_images[1], fit_square(np.asarray(wide), 24))


def test_mvtec_category_layout(tmp_path):
    root = tmp_path / "mvtec"
    for cat in ("bottle", "cable"):
        for i in range(3):
            write(root / cat / "train" / "good" / f"{i:03d}.png", rand(i, 12, 12))
        write(root / cat / "test" / "good" / "000.png", rand(9, 12, 12))
        write(root / cat / "test" / "broken" / "000.png", rand(8, 12, 12))
        write(root / cat / "test" / "crack" / "000.png", rand(7, 12, 12))
        write(root / cat / "ground_truth" / "broken" / "000_mask.png", rand(6, 12, 12, 1))
    (root / "license.txt").write_text("x")
    assert class_names("folder", path=root) == ["bottle", "cable"]
    data = load_one_class("folder", "cable", path=root)
    assert data.counts() == {"train": 3, "test": 3, "test_normal": 1, "test_anomalous": 2}
    assert data.class_names[data.normal_class] == "good"
    normal_image = expected_rgb(root / "cable" / "test" / "good" / "000.png")
    np.testing.assert_array_equal(data.test_images[data.test_labels == 0][0], normal_image)
    with pytest.raises(ValueError, match="out of range"):
        load_one_class("folder", 2, path=root)


def test_corrupt_file_is_named(class_tree, tmp_path):
    bad = class_tree / "test" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(ValueError, match="broken.png"):
        load_one_class("folder", 0, path=class_tree)
    archive = zip_dir(class_tree, tmp_path / "bad.zip")
    with pytest.raises(ValueError, match=r"test/dog/broken\.png"):
        load_one_class("folder", 0, path=archive)


def test_bad_paths_and_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_one_class("folder", 0, path=tmp_path / "missing")
    write(tmp_path / "flat" / "x.png", rand(0, 8, 8))
    with pytest.raises(ValueError, match="known layout"):
        load_one_class("folder", 0, path=tmp_path / "flat")
    (tmp_path / "notzip.zip").write_text("hello")
    with pytest.raises(ValueError, match="neither a directory nor a zip"):
        load_one_class("folder", 0, path=tmp_path / "notzip.zip")
    with pytest.raises(ValueError, match="needs path"):
        load_one_class("folder", 0)


def test_split_is_listed_without_decoding(class_tree):
    with open_tree(class_tree) as tree:
        split = folder_split(tree, "dog")
    assert split.train_files == ["train/dog/a.png", "train/dog/b.jpg"]
    assert len(split.test_files) == 3


@pytest.mark.skipif(not CIFAR_ZIP.exists(), reason="../shared/data/cifar10-jpeg.zip not present")
def test_real_cifar10_jpeg_zip_layout_and_pixels():
    names = class_names("folder", path=CIFAR_ZIP)
    assert names[:3] == ["airplane", "automobile", "bird"] and len(names) == 10
    with open_tree(CIFAR_ZIP) as tree:
        split = folder_split(tree, "cat")
        assert len(split.train_files) == 5000 and len(split.test_files) == 10000
        assert int((split.test_classes == split.normal_class).sum()) == 1000
        if not LOSSLESS.exists():
            return
        ref = np.load(LOSSLESS)
        cats = ref["train_x_first4000"][ref["train_y_first4000"] == 3][:20].astype(float)
        from msad_jax.data.images import decode_all

        mine = decode_all(split.train_files[:20], split.read).astype(float)
    rmse = np.sqrt(((mine[:, None] - cats[None]) ** 2).mean(axis=(2, 3, 4)))
    # JPEG copy of the same image: ~8 grey levels; a different image: far more.
    assert np.diag(rmse).max() < 15
    assert (rmse + np.eye(20) * 1e9).min() > 2 * np.diag(rmse).max()


def smooth(seed, height, width):
    """A photo-like image (smooth gradients plus mild noise): compresses like a photo."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [np.sin(2 * np.pi * (f * xx + g * yy)) for f, g in rng.uniform(0.5, 3, (3, 2))]
    image = 127.5 + 100 * np.stack(channels, axis=-1) + rng.normal(0, 4, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def test_huge_images_of_one_size_are_reduced_while_decoding(tmp_path, monkeypatch):
    """A small stand-in for a folder of huge photos: no image is ever held at full size."""
    from msad_jax.data import images

    side = 1024  # 4x the default 256: the JPEG decoder's 1/4 scale applies
    root = tmp_path / "huge"
    for i in range(3):
        write(root / "train" / "normal" / f"{i}.jpg", smooth(i, side, side), fmt="JPEG")
    write(root / "test" / "normal" / "n.jpg", smooth(10, side, side), fmt="JPEG")
    write(root / "test" / "anomalous" / "a.png", smooth(11, 600, 600))  # PNG: no draft
    seen = []
    original = images.fit_square

    def spy(image, size):
        seen.append(image.size if hasattr(image, "size") else image.shape[1::-1])
        return original(image, size)

    monkeypatch.setattr(images, "fit_square", spy)
    stacked = []
    original_stack = images.stack_images
    monkeypatch.setattr(
        images,
        "stack_images",
        lambda arrays, size: stacked.extend(arrays) or original_stack(arrays, size),
    )
    data = load_one_class("folder", "normal", path=root, num_workers=2)
    assert data.train_images.shape == (3, 256, 256, 3) and data.test_images.shape == (
        2,
        256,
        256,
        3,
    )
    assert {a.shape for a in stacked} == {(256, 256, 3)}  # only reduced images are collected
    jpeg_inputs = sorted(seen)[:-1]  # the PNG is decoded at full size, one at a time
    assert len(seen) == 5 and max(max(s) for s in jpeg_inputs) <= 2 * 256
    # Reduced-scale decoding changes the pixels only a little (torchvision on the full decode).
    oracle = T.Compose([T.Resize(256), T.CenterCrop(256)])
    full = np.asarray(oracle(Image.open(root / "train" / "normal" / "0.jpg").convert("RGB")))
    assert np.abs(data.train_images[0].astype(float) - full).mean() < 3.0


def test_one_common_size_up_to_256_is_kept_and_larger_ones_are_not(tmp_path):
    small, large = tmp_path / "small", tmp_path / "large"
    for root, side in ((small, 32), (large, 300)):
        write(root / "train" / "normal" / "a.png", rand(1, side, side))
        write(root / "test" / "normal" / "b.png", rand(2, side, side))
        write(root / "test" / "anomalous" / "c.png", rand(3, side, side))
    kept = load_one_class("folder", 0, path=small)
    np.testing.assert_array_equal(kept.train_images[0], rand(1, 32, 32))  # pixel for pixel
    assert load_one_class("folder", 0, path=large).test_images.shape == (2, 256, 256, 3)
    assert load_one_class("folder", 0, path=small, image_size=48).train_images.shape[1] == 48


def test_file_list_fingerprint_sees_names_and_sizes_not_times(class_tree, tmp_path):
    from msad_jax.data.folders import file_list_fingerprint

    first = file_list_fingerprint(class_tree)
    assert file_list_fingerprint(zip_dir(class_tree, tmp_path / "same.zip")) == first
    image = class_tree / "train" / "cat" / "img1.png"
    os.utime(image, (0, 0))
    assert file_list_fingerprint(class_tree) == first
    image.rename(class_tree / "train" / "cat" / "img99.png")
    renamed = file_list_fingerprint(class_tree)
    assert renamed != first
    write(class_tree / "train" / "cat" / "img99.png", rand(0, 17, 16))
    assert file_list_fingerprint(class_tree) not in (first, renamed)
