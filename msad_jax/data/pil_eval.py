"""Evaluation preprocessing with Pillow on the host, rounded to uint8 like torchvision's.

``config.eval_resize = 'pil'``: the evaluation images are resized (and center-cropped) by Pillow,
as torchvision's ``Resize`` + ``CenterCrop`` do it on PIL images, so they are rounded to uint8
after resizing; the device then only scales and normalises them (``ToTensor`` + ``Normalize``,
:func:`make_normalize_fn`). The default (``'float'``,
:func:`msad_jax.data.transforms.eval_transform`) resizes in float32 on the device and never
rounds; the two differ by up to about one grey level.

Geometry (that of :func:`msad_jax.data.transforms.eval_geometry`): with ``prep.crop`` set the
shorter side is resized to ``prep.resize`` (``Resize(int)``) and the center ``crop x crop`` kept
(``CenterCrop``); with ``prep.crop = None`` both sides are resized to ``prep.resize``
(``Resize((r, r))``).

:class:`PilResizedImages` presents an image array resized on access (in a thread pool, batch by
batch), so the host never holds every resized image at once.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from msad_jax.data.pil_augment import default_workers
from msad_jax.data.protocols import OneClassData
from msad_jax.data.transforms import (
    Preprocessing,
    eval_geometry,
    make_preprocess_fn,
    normalize,
)

_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def pil_eval_resize(image: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> uint8 ``[S, S, 3]``: Pillow resize (+ center crop) per ``prep``."""
    height, width = image.shape[0], image.shape[1]
    new_h, new_w, top, left = eval_geometry(height, width, prep)
    x = Image.fromarray(np.asarray(image, np.uint8)).resize((new_w, new_h), _FILTERS[prep.method])
    if prep.crop is not None:
        x = x.crop((left, top, left + prep.size, top + prep.size))
    return np.asarray(x)


def make_normalize_fn(prep: Preprocessing) -> Callable[[jax.Array], jax.Array]:
    """``uint8 [b, S, S, 3] -> float32``: scale to [0, 1] and normalise (jit/pmap the caller)."""

    def preprocess(images: jax.Array) -> jax.Array:
        return normalize(jnp.asarray(images).astype(jnp.float32) / 255.0, prep)

    return preprocess


class PilResizedImages:
    """uint8 images ``[n, H, W, 3]`` seen as ``[n, S, S, 3]``, each resized when indexed.

    Supports what the evaluation batching uses: ``len``, ``shape``, ``dtype``, ``ndim`` and
    indexing with an integer, a slice or an integer array (resized in a thread pool).
    """

    def __init__(self, images: np.ndarray, prep: Preprocessing, workers: int = 0) -> None:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"PilResizedImages needs [n, H, W, 3] images, got {images.shape}.")
        self.images = images
        self.prep = prep
        self.workers = workers or default_workers()
        self.shape = (len(images), prep.size, prep.size, 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 4

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, int | np.integer):
            return pil_eval_resize(self.images[index], self.prep)
        source = self.images[index]
        if len(source) < 2 * self.workers:
            resized = [pil_eval_resize(image, self.prep) for image in source]
        else:
            with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
                resized = list(pool.map(lambda im: pil_eval_resize(im, self.prep), source))
        if not resized:
            return np.empty((0, *self.shape[1:]), np.uint8)
        return np.stack(resized)


def eval_data(data: OneClassData, prep: Preprocessing) -> OneClassData:
    """``data`` with its training and test images resized by Pillow on access."""
    return dataclasses.replace(
        data,
        train_images=PilResizedImages(data.train_images, prep),
        test_images=PilResizedImages(data.test_images, prep),
    )


def eval_inputs(
    eval_resize: str, data: OneClassData, holdout_images: np.ndarray, prep: Preprocessing
) -> tuple[OneClassData, Any, Callable[[jax.Array], jax.Array]]:
    """What evaluation feeds the feature extractor, for ``config.eval_resize``.

    Returns:
      ``(data, held-out images, device preprocessing)``: unchanged with the float transform for
      ``'float'``; resized by Pillow on access with normalisation only for ``'pil'``.
    """
    if eval_resize == "float":
        return data, holdout_images, make_preprocess_fn(prep)
    if eval_resize != "pil":
        raise ValueError(f"eval_resize={eval_resize!r} is not one of 'float', 'pil'.")
    return eval_data(data, prep), PilResizedImages(holdout_images, prep), make_normalize_fn(prep)
