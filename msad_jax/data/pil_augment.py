"""MoCo-v2 training augmentation on the host with Pillow, as torchvision runs it (SPEC §6).

The alternative to the on-device augmentation of :mod:`msad_jax.data.augment`
(``config.augment = 'pil'``): each view is made by Pillow exactly as torchvision's transforms make
it on a PIL image, 8-bit rounding after every operation included::

    RandomResizedCrop(S, scale=(0.2, 1), ratio=(3/4, 4/3))   # crop, then Pillow bilinear resize
    RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p=0.8)       # the four in a random order
    RandomGrayscale(p=0.2)
    RandomApply(GaussianBlur(sigma ~ U[0.1, 2.0]), p=0.5)     # ImageFilter.GaussianBlur(radius)
    RandomHorizontalFlip(p=0.5)

The parameters are those of :mod:`msad_jax.data.augment` (the same constants). The random
decisions of one view (:class:`PilAugmentParams`) are drawn by :func:`sample_params` from a NumPy
generator seeded by ``(seed, step, view, row of the global batch)`` (:func:`example_rng`), so the
views do not depend on the number of devices, hosts or worker threads, and a resumed run draws
the views an uninterrupted one would have drawn. :func:`apply_params` applies them with Pillow's
operations, which are torchvision's own for PIL images: ``Image.crop`` + ``Image.resize``,
``ImageEnhance.Brightness`` / ``Contrast`` / ``Color``, the HSV hue shift of torchvision's
``adjust_hue``, ``convert('L')``, ``ImageFilter.GaussianBlur`` and ``FLIP_LEFT_RIGHT``.

Views leave the host as uint8 ``[S, S, 3]`` (4x less to transfer than float32); on the device
:func:`normalize_views` scales them to [0, 1] and normalises them (``ToTensor`` + ``Normalize``).
:func:`host_view_batches` augments the batches of :func:`msad_jax.data.pipeline.train_batches`
in a thread pool (Pillow releases the GIL in its image operations) a few batches ahead of the
training step.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from msad_jax.data import augment
from msad_jax.data.transforms import Preprocessing, normalize

VIEWS = 2
CHUNK = 4  # images per worker task


@dataclasses.dataclass(frozen=True)
class PilAugmentParams:
    """The random decisions for one view (torchvision's parameters, in its units).

    Attributes:
      top, left, height, width: crop box in source pixels.
      jitter: colour jitter applied.
      brightness, contrast, saturation: factors in [0.6, 1.4].
      hue: shift in turns, in [-0.1, 0.1].
      order: permutation of (0 brightness, 1 contrast, 2 saturation, 3 hue).
      grayscale: converted to grayscale (3 equal channels).
      blur: Gaussian blur applied.
      sigma: blur radius (Pillow's standard deviation) in [0.1, 2.0] output pixels.
      flip: mirrored horizontally.
    """

    top: int
    left: int
    height: int
    width: int
    jitter: bool
    brightness: float
    contrast: float
    saturation: float
    hue: float
    order: tuple[int, int, int, int]
    grayscale: bool
    blur: bool
    sigma: float
    flip: bool


def example_rng(seed: int, step: int, view: int, row: int) -> np.random.Generator:
    """The generator of one view: PCG64 seeded by ``(seed, step, view, row)``."""
    return np.random.default_rng([int(seed), int(step), int(view), int(row)])


def sample_crop(rng: np.random.Generator, height: int, width: int) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` drawn as torchvision's ``RandomResizedCrop.get_params``.

    Up to 10 attempts of (area fraction ~ U[0.2, 1], log aspect ratio ~ U[log 3/4, log 4/3]),
    ``w = round(sqrt(area * r))``, ``h = round(sqrt(area / r))``; the first that fits wins, with
    uniform integer top/left; otherwise the central crop clamped to the ratio range.
    """
    area = height * width
    log_lo, log_hi = math.log(augment.CROP_RATIO[0]), math.log(augment.CROP_RATIO[1])
    for _ in range(augment.CROP_ATTEMPTS):
        target = area * rng.uniform(*augment.CROP_SCALE)
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    h, w = augment.central_crop_size(height, width)
    return (height - h) // 2, (width - w) // 2, h, w


def sample_params(rng: np.random.Generator, height: int, width: int) -> PilAugmentParams:
    """Draws the MoCo-v2 decisions of one view of a ``height x width`` source image.

    Every factor is drawn whether or not its operation is applied (a fixed number of draws after
    the crop); the distribution of what is applied is torchvision's.
    """
    top, left, h, w = sample_crop(rng, height, width)
    u = rng.random(9)
    order = tuple(int(i) for i in rng.permutation(4))
    return PilAugmentParams(
        top=top,
        left=left,
        height=h,
        width=w,
        jitter=bool(u[0] < augment.JITTER_PROB),
        brightness=float(1.0 + augment.BRIGHTNESS * (2.0 * u[1] - 1.0)),
        contrast=float(1.0 + augment.CONTRAST * (2.0 * u[2] - 1.0)),
        saturation=float(1.0 + augment.SATURATION * (2.0 * u[3] - 1.0)),
        hue=float(augment.HUE * (2.0 * u[4] - 1.0)),
        order=order,  # type: ignore[arg-type]
        grayscale=bool(u[5] < augment.GRAYSCALE_PROB),
        blur=bool(u[6] < augment.BLUR_PROB),
        sigma=float(augment.BLUR_SIGMA[0] + (augment.BLUR_SIGMA[1] - augment.BLUR_SIGMA[0]) * u[7]),
        flip=bool(u[8] < augment.FLIP_PROB),
    )


def adjust_hue(image: Image.Image, hue: float) -> Image.Image:
    """torchvision's ``adjust_hue`` on a PIL RGB image: add ``int(hue * 255)`` mod 256 to H."""
    h, s, v = image.convert("HSV").split()
    shifted = np.asarray(h, dtype=np.uint8) + np.array(int(hue * 255)).astype(np.uint8)
    h = Image.fromarray(shifted.astype(np.uint8), "L")
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def _jitter_op(image: Image.Image, op: int, params: PilAugmentParams) -> Image.Image:
    if op == augment.BRIGHTNESS_OP:
        return ImageEnhance.Brightness(image).enhance(params.brightness)
    if op == augment.CONTRAST_OP:
        return ImageEnhance.Contrast(image).enhance(params.contrast)
    if op == augment.SATURATION_OP:
        return ImageEnhance.Color(image).enhance(params.saturation)
    return adjust_hue(image, params.hue)


def apply_params(image: Image.Image, params: PilAugmentParams, size: int) -> Image.Image:
    """Applies the decisions ``params`` to an RGB image; returns the ``size x size`` view."""
    box = (params.left, params.top, params.left + params.width, params.top + params.height)
    x = image.crop(box).resize((size, size), Image.Resampling.BILINEAR)
    if params.jitter:
        for op in params.order:
            x = _jitter_op(x, op, params)
    if params.grayscale:
        x = x.convert("L").convert("RGB")
    if params.blur:
        x = x.filter(ImageFilter.GaussianBlur(radius=params.sigma))
    if params.flip:
        x = x.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return x


def augment_image(image: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """One MoCo-v2 view of a uint8 ``[H, W, 3]`` image: uint8 ``[size, size, 3]``."""
    params = sample_params(rng, image.shape[0], image.shape[1])
    return np.asarray(apply_params(Image.fromarray(image), params, size))


def default_workers() -> int:
    """Worker threads for :func:`host_view_batches`: the CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _fill_views(
    out: np.ndarray, images: np.ndarray, rows: np.ndarray, *, seed: int, step: int, size: int
) -> None:
    """Writes both views of ``images[i]`` (global row ``rows[i]``) into ``out[:, i]``."""
    for i, (image, row) in enumerate(zip(images, rows, strict=True)):
        for view in range(VIEWS):
            out[view, i] = augment_image(image, example_rng(seed, step, view, row), size)


def batch_views(
    images: np.ndarray, rows: np.ndarray, *, seed: int, step: int, size: int
) -> np.ndarray:
    """Both views of every image of a batch, in this thread.

    Args:
      images: uint8 ``[n, H, W, 3]``.
      rows: ``[n]`` rows of the images in the global batch (their views' seeds).
      seed: run seed.
      step: global training step (0-based).
      size: view side.

    Returns:
      uint8 ``[2, n, size, size, 3]``.
    """
    out = np.empty((VIEWS, len(images), size, size, 3), np.uint8)
    _fill_views(out, images, rows, seed=seed, step=step, size=size)
    return out


def host_view_batches(
    batches: Iterable[dict[str, np.ndarray]],
    *,
    size: int,
    seed: int,
    first_step: int,
    process_index: int = 0,
    workers: int = 0,
    ahead: int = 2,
) -> Iterator[dict[str, np.ndarray]]:
    """Replaces each batch's images by two host-augmented uint8 views, a few batches ahead.

    Args:
      batches: host batches ``{'image': uint8 [d, b, H, W, 3], 'mask': bool [d, b]}`` of
        consecutive steps (:func:`msad_jax.data.pipeline.train_batches`).
      size: view side (the model's input side).
      seed: run seed.
      first_step: global step of the first batch.
      process_index: this process; its batches hold rows ``process_index * d * b + ...`` of the
        global batch.
      workers: worker threads (0 = :func:`default_workers`).
      ahead: batches augmented ahead of the one being consumed.

    Yields:
      ``{'view1', 'view2': uint8 [d, b, size, size, 3], 'mask': bool [d, b]}`` in order.
    """
    workers = workers or default_workers()
    pending: collections.deque = collections.deque()
    iterator = iter(batches)
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="pil_augment") as pool:

        def submit(step: int) -> bool:
            batch = next(iterator, None)
            if batch is None:
                return False
            image = np.asarray(batch["image"])
            devices, per_device = image.shape[:2]
            local = devices * per_device
            rows = process_index * local + np.arange(local)
            images = image.reshape(local, *image.shape[2:])
            out = np.empty((VIEWS, local, size, size, 3), np.uint8)
            futures = [
                pool.submit(
                    _fill_views,
                    out[:, lo : lo + CHUNK],
                    images[lo : lo + CHUNK],
                    rows[lo : lo + CHUNK],
                    seed=seed,
                    step=step,
                    size=size,
                )
                for lo in range(0, local, CHUNK)
            ]
            pending.append((futures, out, batch["mask"], devices, per_device))
            return True

        step = first_step
        while len(pending) < ahead + 1 and submit(step):
            step += 1
        try:
            while pending:
                futures, out, mask, devices, per_device = pending.popleft()
                for future in futures:
                    future.result()
                if submit(step):
                    step += 1
                views = out.reshape(VIEWS, devices, per_device, size, size, 3)
                yield {"view1": views[0], "view2": views[1], "mask": mask}
        finally:
            for futures, *_ in pending:
                for future in futures:
                    future.cancel()


def normalize_views(batch: dict[str, Any], prep: Preprocessing) -> dict[str, Any]:
    """uint8 ``'view1'``/``'view2'`` scaled to [0, 1] and normalised (jnp; on device)."""
    out = dict(batch)
    for key in ("view1", "view2"):
        out[key] = normalize(jnp.asarray(batch[key]).astype(jnp.float32) / 255.0, prep)
    return out


def with_normalized_views(step: Callable[..., Any], prep: Preprocessing) -> Callable[..., Any]:
    """Wraps a per-device training step ``(state, batch, center)`` taking float views.

    The wrapped step takes the uint8 views of :func:`host_view_batches` and normalises them
    first, inside the same (pmapped) computation.
    """

    def wrapped(state: Any, batch: dict[str, jax.Array], center: jax.Array | None) -> Any:
        return step(state, normalize_views(batch, prep), center)

    return wrapped
