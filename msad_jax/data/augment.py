"""MoCo-v2 training augmentation on device (SPEC §6), one PRNG key per example.

torchvision's pipeline (RandomResizedCrop, ColorJitter p=0.8 in random order, RandomGrayscale
p=0.2, GaussianBlur p=0.5, flip) in float32 with static shapes. Decisions are drawn first
(:func:`sample_augment_params`) and then applied (:func:`apply_augment_params`), so tests check
each separately. Brightness, contrast, saturation, crop and blur are written here because dm-pix's
versions differ from torchvision's (offset vs factor, per-channel means, zero padding); hue uses
``pix.adjust_hue``. The flip is folded into the crop's resampling weights.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import dm_pix as pix
import jax
import jax.numpy as jnp

from msad_jax.data.transforms import Preprocessing, normalize, resample_weights, separable_resample

CROP_SCALE: tuple[float, float] = (0.2, 1.0)
CROP_RATIO: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10
JITTER_PROB = 0.8
BRIGHTNESS = CONTRAST = SATURATION = 0.4
HUE = 0.1
GRAYSCALE_PROB = 0.2
BLUR_PROB = 0.5
BLUR_SIGMA: tuple[float, float] = (0.1, 2.0)
BLUR_KERNEL_SIZE = 13
FLIP_PROB = 0.5

# Indices in ``AugmentParams.order`` (torchvision's ColorJitter numbering).
BRIGHTNESS_OP, CONTRAST_OP, SATURATION_OP, HUE_OP = 0, 1, 2, 3
_LUMA = (0.2989, 0.587, 0.114)


class AugmentParams(NamedTuple):
    """The random decisions for one image (a pytree; batched with a leading axis under vmap).

    Attributes:
      top, left, height, width: int32 crop box in source pixels.
      fallback: bool, True when none of the 10 attempts fitted and the central crop was used.
      jitter: bool, colour jitter applied.
      brightness, contrast, saturation: float32 factors in [0.6, 1.4].
      hue: float32 shift in [-0.1, 0.1].
      order: int32 [4], permutation of (brightness, contrast, saturation, hue) = (0, 1, 2, 3).
      grayscale: bool, converted to grayscale.
      blur: bool, Gaussian blur applied.
      sigma: float32 blur standard deviation in [0.1, 2.0] (pixels of the output image).
      flip: bool, mirrored horizontally.
    """

    top: jax.Array
    left: jax.Array
    height: jax.Array
    width: jax.Array
    fallback: jax.Array
    jitter: jax.Array
    brightness: jax.Array
    contrast: jax.Array
    saturation: jax.Array
    hue: jax.Array
    order: jax.Array
    grayscale: jax.Array
    blur: jax.Array
    sigma: jax.Array
    flip: jax.Array


def central_crop_size(height: int, width: int) -> tuple[int, int]:
    """Fallback crop size of torchvision ``(h, w)``: the whole image clamped to the ratio range."""
    in_ratio = width / height
    if in_ratio < min(CROP_RATIO):
        w = width
        h = int(round(w / min(CROP_RATIO)))
    elif in_ratio > max(CROP_RATIO):
        h = height
        w = int(round(h * max(CROP_RATIO)))
    else:
        w, h = width, height
    return h, w


def _uniform_int(u: jax.Array, count: jax.Array) -> jax.Array:
    """Uniform integer in [0, count) from ``u ~ U[0, 1)``."""
    return jnp.minimum(jnp.floor(u * count), count - 1).astype(jnp.int32)


def sample_crop(u: jax.Array, height: int, width: int) -> tuple[jax.Array, ...]:
    """Draws a crop box like torchvision's ``RandomResizedCrop.get_params``, fixed-size loop.

    Args:
      u: 22 independent U[0, 1) numbers (10 areas, 10 log-ratios, top, left).
      height: static source height.
      width: static source width.

    Returns:
      ``(top, left, h, w, fallback)`` as int32 scalars and a bool.
    """
    area = float(height * width)
    lo, hi = CROP_SCALE
    target = area * (lo + (hi - lo) * u[:CROP_ATTEMPTS])
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    ratio = jnp.exp(log_lo + (log_hi - log_lo) * u[CROP_ATTEMPTS : 2 * CROP_ATTEMPTS])
    ws = jnp.round(jnp.sqrt(target * ratio)).astype(jnp.int32)
    hs = jnp.round(jnp.sqrt(target / ratio)).astype(jnp.int32)
    fits = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
    first = jnp.argmax(fits)
    found = jnp.any(fits)
    fb_h, fb_w = central_crop_size(height, width)
    h = jnp.where(found, hs[first], fb_h)
    w = jnp.where(found, ws[first], fb_w)
    top = jnp.where(found, _uniform_int(u[2 * CROP_ATTEMPTS], height - h + 1), (height - fb_h) // 2)
    left = jnp.where(
        found, _uniform_int(u[2 * CROP_ATTEMPTS + 1], width - w + 1), (width - fb_w) // 2
    )
    return top, left, h, w, ~found


_CROP_DRAWS = 2 * CROP_ATTEMPTS + 2


def sample_augment_params(key: jax.Array, height: int, width: int) -> AugmentParams:
    """Draws the MoCo-v2 decisions for one image of static size ``height x width``."""
    u = jax.random.uniform(key, (_CROP_DRAWS + 13,))
    top, left, h, w, fallback = sample_crop(u[:_CROP_DRAWS], height, width)
    v = u[_CROP_DRAWS:]

    def between(x: jax.Array, lo: float, hi: float) -> jax.Array:
        return lo + (hi - lo) * x

    return AugmentParams(
        top=top,
        left=left,
        height=h,
        width=w,
        fallback=fallback,
        jitter=v[0] < JITTER_PROB,
        brightness=between(v[1], 1.0 - BRIGHTNESS, 1.0 + BRIGHTNESS),
        contrast=between(v[2], 1.0 - CONTRAST, 1.0 + CONTRAST),
        saturation=between(v[3], 1.0 - SATURATION, 1.0 + SATURATION),
        hue=between(v[4], -HUE, HUE),
        order=jnp.argsort(v[5:9]).astype(jnp.int32),
        grayscale=v[9] < GRAYSCALE_PROB,
        blur=v[10] < BLUR_PROB,
        sigma=between(v[11], *BLUR_SIGMA),
        flip=v[12] < FLIP_PROB,
    )


def resized_crop(
    image: jax.Array,
    top: jax.Array,
    left: jax.Array,
    height: jax.Array,
    width: jax.Array,
    size: int,
    flip: jax.Array | bool = False,
) -> jax.Array:
    """Crops ``[top:top+height, left:left+width]`` and resizes it to ``size x size`` (bilinear).

    Args:
      image: ``[H, W, C]`` pixel values in 0..255 (any dtype).
      top: first row of the crop (int scalar, may be traced).
      left: first column of the crop.
      height: crop height.
      width: crop width.
      size: static output side.
      flip: mirror the output horizontally.

    Returns:
      float32 ``[C, size, size]`` (channels first, see :func:`color_jitter`) in 0..255.
    """
    in_h, in_w = image.shape[0], image.shape[1]
    f32 = jnp.float32
    wy = resample_weights(
        jnp.asarray(top, f32), jnp.asarray(height, f32), in_h, size, "bilinear", jnp
    )
    wx = resample_weights(
        jnp.asarray(left, f32), jnp.asarray(width, f32), in_w, size, "bilinear", jnp
    )
    wx = jnp.where(flip, wx[::-1], wx)
    return separable_resample(image.astype(f32), wy, wx, channels_first=True)


# Colour operations work on channels-first images [3, H, W] in [0, 1] (torchvision's tensor
# layout): whole-plane arithmetic vectorises about twice as fast as channels-last on CPU.


def rgb_to_gray(image: jax.Array) -> jax.Array:
    """Luma ``[1, H, W]`` of ``[3, H, W]``: rec601 weights, as ``pix.rgb_to_grayscale``."""
    return (_LUMA[0] * image[0] + _LUMA[1] * image[1] + _LUMA[2] * image[2])[None]


def _blend(image: jax.Array, other: jax.Array, factor: jax.Array) -> jax.Array:
    """Blend as torchvision: ``clamp(f * img + (1 - f) * other, 0, 1)``."""
    return jnp.clip(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def adjust_brightness(image: jax.Array, factor: jax.Array) -> jax.Array:
    """As torchvision ``adjust_brightness``: multiply by ``factor``, clamp to [0, 1]."""
    return _blend(image, jnp.zeros_like(image), factor)


def adjust_contrast(image: jax.Array, factor: jax.Array) -> jax.Array:
    """As torchvision ``adjust_contrast``: blend with the mean of the grayscale image, clamp."""
    return _blend(image, jnp.mean(rgb_to_gray(image)), factor)


def adjust_saturation(image: jax.Array, factor: jax.Array) -> jax.Array:
    """As torchvision ``adjust_saturation``: blend with the grayscale image, clamp."""
    return _blend(image, rgb_to_gray(image), factor)


def adjust_hue(image: jax.Array, delta: jax.Array) -> jax.Array:
    """As torchvision ``adjust_hue`` (tensor semantics), computed by ``pix.adjust_hue``."""
    return jnp.clip(pix.adjust_hue(image, delta, channel_axis=0), 0.0, 1.0)


def _blend_slot(
    image: jax.Array, op: jax.Array, factors: jax.Array, active: jax.Array
) -> jax.Array:
    """Applies blend operation ``op`` (0, 1 or 2) with its factor, or nothing if not active."""
    factor = jnp.where(active & (op < HUE_OP), factors[jnp.minimum(op, 2)], 1.0)
    gray = rgb_to_gray(image)
    other = jnp.where(op == SATURATION_OP, gray, jnp.where(op == CONTRAST_OP, jnp.mean(gray), 0.0))
    return _blend(image, other, factor)


def color_jitter(
    image: jax.Array,
    brightness: jax.Array,
    contrast: jax.Array,
    saturation: jax.Array,
    hue: jax.Array,
    order: jax.Array,
) -> jax.Array:
    """Applies torchvision's ``ColorJitter`` with given factors, in the order ``order``.

    Args:
      image: float ``[3, H, W]`` in [0, 1].
      brightness: brightness factor (1 = unchanged).
      contrast: contrast factor.
      saturation: saturation factor.
      hue: hue shift in turns (0 = unchanged).
      order: int [4] permutation of (0 brightness, 1 contrast, 2 saturation, 3 hue).

    Returns:
      The jittered image, float ``[3, H, W]`` in [0, 1].
    """
    factors = jnp.stack([brightness, contrast, saturation]).astype(image.dtype)
    hue_at = jnp.argmax(order == HUE_OP)
    x = image
    for slot in range(3):  # positions before the hue shift
        x = _blend_slot(x, order[slot], factors, slot < hue_at)
    x = adjust_hue(x, hue)
    for slot in range(1, 4):  # positions after the hue shift
        x = _blend_slot(x, order[slot], factors, slot > hue_at)
    return x


def blur_kernel(sigma: jax.Array) -> jax.Array:
    """Normalised 13-tap Gaussian ``exp(-x^2 / (2 sigma^2))``, x = -6..6 (as dm-pix builds it)."""
    radius = BLUR_KERNEL_SIZE // 2
    x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    k = jnp.exp(-(x**2) / (2.0 * jnp.asarray(sigma, jnp.float32) ** 2))
    return k / jnp.sum(k)


def separable_blur(image: jax.Array, kernel: jax.Array) -> jax.Array:
    """Convolves ``[C, H, W]`` with a 13-tap ``kernel`` along H and W, edges replicated."""
    radius = BLUR_KERNEL_SIZE // 2
    height, width = image.shape[-2], image.shape[-1]
    padded = jnp.pad(image, ((0, 0), (radius, radius), (0, 0)), mode="edge")
    x = sum(kernel[t] * padded[:, t : t + height, :] for t in range(BLUR_KERNEL_SIZE))
    padded = jnp.pad(x, ((0, 0), (0, 0), (radius, radius)), mode="edge")
    return sum(kernel[t] * padded[:, :, t : t + width] for t in range(BLUR_KERNEL_SIZE))


def gaussian_blur(image: jax.Array, sigma: jax.Array) -> jax.Array:
    """Gaussian blur of ``[C, H, W]``, edges replicated (as PIL; dm-pix pads with zeros)."""
    return separable_blur(image, blur_kernel(sigma))


_IDENTITY_KERNEL = tuple(float(t == BLUR_KERNEL_SIZE // 2) for t in range(BLUR_KERNEL_SIZE))


def apply_augment_params(image: jax.Array, params: AugmentParams, prep: Preprocessing) -> jax.Array:
    """Applies the decisions ``params`` to one uint8 image ``[H, W, 3]``.

    Returns:
      float32 ``[S, S, 3]``, ``S = prep.size``, normalised with ``prep``'s mean/std.
    """
    x = resized_crop(
        image, params.top, params.left, params.height, params.width, prep.size, params.flip
    )
    x = x / 255.0
    on = params.jitter
    x = color_jitter(
        x,
        jnp.where(on, params.brightness, 1.0),
        jnp.where(on, params.contrast, 1.0),
        jnp.where(on, params.saturation, 1.0),
        jnp.where(on, params.hue, 0.0),
        params.order,
    )
    gray = params.grayscale.astype(x.dtype)
    x = x * (1.0 - gray) + rgb_to_gray(x) * gray
    kernel = jnp.where(params.blur, blur_kernel(params.sigma), jnp.asarray(_IDENTITY_KERNEL))
    x = separable_blur(x, kernel)
    return normalize(jnp.transpose(x, (1, 2, 0)), prep)


def _check_images(images: jax.Array) -> None:
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"train_augment expects uint8 images [b, H, W, 3], got shape {images.shape}."
        )


def sample_batch_params(key: jax.Array, images: jax.Array) -> AugmentParams:
    """Per-example decisions for a batch: ``key`` split into one key per example."""
    _check_images(images)
    keys = jax.random.split(key, images.shape[0])
    height, width = images.shape[1], images.shape[2]
    return jax.vmap(lambda k: sample_augment_params(k, height, width))(keys)


def augment_examples(keys: jax.Array, images: jax.Array, prep: Preprocessing) -> jax.Array:
    """MoCo-v2 augmentation of each image with its own key, then normalisation.

    Args:
      keys: ``[b]`` PRNG keys, one per example.
      images: uint8 ``[b, H, W, 3]`` (static H, W).
      prep: output side ``prep.size`` and normalisation.

    Returns:
      float32 ``[b, S, S, 3]``.
    """
    images = jnp.asarray(images)
    _check_images(images)
    height, width = images.shape[1], images.shape[2]
    params = jax.vmap(lambda k: sample_augment_params(k, height, width))(keys)
    return jax.vmap(lambda img, p: apply_augment_params(img, p, prep))(images, params)


def train_augment(key: jax.Array, images: jax.Array, prep: Preprocessing) -> jax.Array:
    """MoCo-v2 augmentation of a batch from one key (split into one key per example).

    Args:
      key: PRNG key for the whole batch.
      images: uint8 ``[b, H, W, 3]`` (static H, W).
      prep: output side ``prep.size`` and normalisation.

    Returns:
      float32 ``[b, S, S, 3]``; equal to ``augment_examples(jax.random.split(key, b), ...)``.
    """
    images = jnp.asarray(images)
    _check_images(images)
    return augment_examples(jax.random.split(key, images.shape[0]), images, prep)


def make_augment_fn(prep: Preprocessing) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Returns ``(keys [b], images_uint8 [b, H, W, 3]) -> float32 [b, S, S, 3]``."""
    return functools.partial(augment_examples, prep=prep)
