"""Host-side image decoding and size normalisation with Pillow.

Every source ends in uint8 RGB of one size: other modes are converted (alpha dropped, as
torchvision's loader does); :func:`fit_square` scales the shorter side (bilinear, antialiased) and
center-crops. Without ``image_size``, images are resized to 256 only when larger or of mixed
sizes (32x32 CIFAR files stay as they are). Files are resized while decoding, JPEGs at a reduced
DCT scale first, so huge images are never held at full size.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, UnidentifiedImageError

from msad_jax.errors import InputError

DEFAULT_IMAGE_SIZE = 256


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any Pillow image as uint8 ``[H, W, 3]``."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def fit_square(image: np.ndarray | Image.Image, size: int) -> np.ndarray:
    """Resizes the shorter side to ``size`` (bilinear) and center-crops to ``size x size``.

    Args:
      image: uint8 ``[H, W, 3]`` array or a Pillow image.
      size: output side.

    Returns:
      uint8 ``[size, size, 3]``.
    """
    pil = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    if pil.mode != "RGB":
        pil = pil.convert("RGB")
    width, height = pil.size
    if (width, height) == (size, size):
        return np.asarray(pil, dtype=np.uint8)
    if height <= width:
        new_h, new_w = size, int(size * width / height)
    else:
        new_h, new_w = int(size * height / width), size
    if (new_w, new_h) != (width, height):
        pil = pil.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return np.asarray(pil.crop((left, top, left + size, top + size)), dtype=np.uint8)


def decode_image(data: bytes, name: str, *, size: int | None = None) -> np.ndarray:
    """Decodes encoded image bytes (PNG, JPEG, BMP, ...) to uint8 RGB ``[H, W, 3]``.

    Args:
      data: the encoded file.
      name: the file's name, for the error message.
      size: if given, the image is fitted to ``size x size`` (:func:`fit_square`) as it is decoded;
        a large JPEG is decoded at a reduced scale first (see the module doc).

    Raises:
      InputError: naming ``name`` when Pillow cannot read the bytes.
    """
    return decode_bounded(data, name, size=size, max_side=None)


def decode_bounded(data: bytes, name: str, *, size: int | None, max_side: int | None) -> np.ndarray:
    """Decodes bytes to uint8 RGB, never keeping more than the output size.

    Args:
      data: the encoded file.
      name: the file's name, for the error message.
      size: fit every image to ``size x size``; None: keep the native size, unless...
      max_side: ...the image's longer side exceeds ``max_side``: then fit it to ``max_side``.

    Raises:
      InputError: naming ``name`` when Pillow cannot read the bytes.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            target = size
            if target is None and max_side is not None and max(image.size) > max_side:
                target = max_side
            if target is not None:
                image.draft(None, (target, target))  # JPEG: decode at a reduced scale
            image.load()
            return to_rgb_array(image) if target is None else fit_square(image, target)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise InputError(
            f"Cannot decode image file {name!r} ({type(err).__name__}: {err}); "
            "remove or replace it."
        ) from err


def default_workers() -> int:
    """Threads used for decoding: Pillow releases the GIL while decoding."""
    return max(1, min(8, os.cpu_count() or 1))


def decode_all(
    names: Sequence[str],
    read: Callable[[str], bytes],
    *,
    image_size: int | None = None,
    num_workers: int | None = None,
) -> np.ndarray:
    """Reads and decodes ``names`` with a thread pool into one uint8 ``[N, S, S, 3]`` array.

    Args:
      names: file names, in output order.
      read: returns the encoded bytes of a name.
      image_size: resize every image to this side (:func:`fit_square`); None: images larger than
        ``DEFAULT_IMAGE_SIZE``, or all images when their sizes differ, are resized to
        ``DEFAULT_IMAGE_SIZE``, and images that all share one smaller size keep it.
      num_workers: decoding threads (default :func:`default_workers`).

    Returns:
      uint8 ``[N, H, W, 3]``.
    """

    def load(name: str) -> np.ndarray:
        return decode_bounded(read(name), name, size=image_size, max_side=DEFAULT_IMAGE_SIZE)

    workers = num_workers or default_workers()
    if workers > 1 and len(names) > 1:
        with ThreadPoolExecutor(workers) as pool:
            arrays = list(pool.map(load, names))
    else:
        arrays = [load(name) for name in names]
    return stack_images(arrays, image_size)


def stack_images(arrays: Sequence[np.ndarray], image_size: int | None = None) -> np.ndarray:
    """Stacks RGB arrays, resizing them to a common square when sizes differ (see module doc)."""
    if not arrays:
        side = image_size or DEFAULT_IMAGE_SIZE
        return np.zeros((0, side, side, 3), np.uint8)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1 or (image_size is not None and shapes != {(image_size, image_size, 3)}):
        side = image_size or DEFAULT_IMAGE_SIZE
        arrays = [fit_square(a, side) for a in arrays]
    return np.stack(arrays).astype(np.uint8, copy=False)
