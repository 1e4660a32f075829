"""Evaluation transforms on device: resize, center crop, normalise (SPEC §6).

Pillow's antialiased bilinear/bicubic resampling as two constant weight matrices, so resize and
center crop are one pass of two matrix products (the same weights, with traced crop boxes, do the
augmentation's crop). In float32 without Pillow's 8-bit rounding: within about one grey level of
torchvision (up to ~4 at strong edges for bicubic when one axis shrinks and the other grows).
:func:`any_size_transform` first fits any image size to the training side, with symbolic shapes.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from msad_jax.preprocessing import Preprocessing

_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}
_CUBIC_A = -0.5  # Pillow's bicubic coefficient.
_PRECISION = jax.lax.Precision.HIGHEST


def _filter(x: np.ndarray | jax.Array, method: str, xp) -> np.ndarray | jax.Array:
    """Pillow's resampling filters evaluated at distances ``x`` (in filter units)."""
    ax = xp.abs(x)
    if method == "bilinear":
        return xp.maximum(1.0 - ax, 0.0)
    a = _CUBIC_A
    near = ((a + 2.0) * ax - (a + 3.0)) * ax * ax + 1.0
    far = ((a * ax - 5.0 * a) * ax + 8.0 * a) * ax - 4.0 * a
    return xp.where(ax < 1.0, near, xp.where(ax < 2.0, far, 0.0))


def resample_weights(start, length, in_size: int, out_size: int, method: str, xp):
    """Weights ``[out_size, in_size]`` resizing source pixels [start, start+length) to out_size."""
    scale = length / out_size
    fscale = xp.maximum(scale, 1.0)
    support = _SUPPORT[method] * fscale
    center = (xp.arange(out_size, dtype=xp.float32)[:, None] + 0.5) * scale  # [out, 1]
    k = xp.arange(in_size, dtype=xp.float32)[None, :] - start  # [1, in], crop coordinates
    lo = xp.maximum(xp.trunc(center - support + 0.5), 0.0)
    hi = xp.minimum(xp.trunc(center + support + 0.5), length)
    inside = (k >= lo) & (k < hi)
    w = xp.where(inside, _filter((k + 0.5 - center) / fscale, method, xp), 0.0)
    return w / xp.sum(w, axis=1, keepdims=True)


def resize_crop_weights(
    in_size: int, resized: int, crop_start: int, out_size: int, method: str
) -> np.ndarray:
    """Constant weights ``[out_size, in_size]``: resize one axis to ``resized``, keep a window.

    Args:
      in_size: source length along the axis.
      resized: length after resizing.
      crop_start: first resized pixel kept.
      out_size: number of resized pixels kept.
      method: 'bilinear' or 'bicubic'.

    Returns:
      float32 weights; row ``o`` produces resized pixel ``crop_start + o``.
    """
    full = resample_weights(0.0, float(in_size), in_size, resized, method, np)
    return full[crop_start : crop_start + out_size].astype(np.float32)


def eval_geometry(height: int, width: int, prep: Preprocessing) -> tuple[int, int, int, int]:
    """Geometry of torchvision's Resize + CenterCrop: ``(resized_h, resized_w, top, left)``."""
    if prep.crop is None:
        return prep.resize, prep.resize, 0, 0
    if height <= width:
        new_h, new_w = prep.resize, int(prep.resize * width / height)
    else:
        new_h, new_w = int(prep.resize * height / width), prep.resize
    top = int(round((new_h - prep.crop) / 2.0))
    left = int(round((new_w - prep.crop) / 2.0))
    return new_h, new_w, top, left


def normalize(images01: jax.Array, prep: Preprocessing) -> jax.Array:
    """``(x - mean) / std`` per channel for images in [0, 1] (channels last)."""
    mean = jnp.asarray(prep.mean, jnp.float32)
    std = jnp.asarray(prep.std, jnp.float32)
    return (images01 - mean) / std


def separable_resample(
    images: jax.Array, wy: jax.Array, wx: jax.Array, *, channels_first: bool = False
) -> jax.Array:
    """Resamples ``[..., H, W, C]`` pixel values (0..255) to ``[..., P, Q, C]``.

    Width pass first, clipped to [0, 255] as Pillow stores it as uint8 (matters for bicubic's
    overshoot), then the height pass; ``channels_first`` gives ``[..., C, P, Q]``.
    """
    x = jnp.einsum("qw,...hwc->...chq", wx, images, precision=_PRECISION)
    x = jnp.clip(x, 0.0, 255.0)
    out = "...cpq" if channels_first else "...pqc"
    x = jnp.einsum(f"ph,...chq->{out}", wy, x, precision=_PRECISION)
    return jnp.clip(x, 0.0, 255.0)


def eval_transform(images: jax.Array | np.ndarray, prep: Preprocessing) -> jax.Array:
    """Evaluation transform of SPEC §6 on a batch: resize, center crop, scale, normalise.

    Args:
      images: uint8 ``[b, H, W, 3]`` (or ``[H, W, 3]``); H and W static.
      prep: the backbone's preprocessing.

    Returns:
      float32 ``[b, S, S, 3]`` with ``S = prep.size``.
    """
    images = jnp.asarray(images)
    if images.ndim not in (3, 4) or images.shape[-1] != 3:
        raise ValueError(f"eval_transform expects [b, H, W, 3] images, got shape {images.shape}.")
    height, width = images.shape[-3], images.shape[-2]
    new_h, new_w, top, left = eval_geometry(height, width, prep)
    wy = resize_crop_weights(height, new_h, top, prep.size, prep.method)
    wx = resize_crop_weights(width, new_w, left, prep.size, prep.method)
    x = separable_resample(images.astype(jnp.float32), jnp.asarray(wy), jnp.asarray(wx))
    return normalize(x / 255.0, prep)


def to_rgb(images: jax.Array) -> jax.Array:
    """``[..., C]`` with C = 1 (L), 2 (LA), 3 (RGB) or 4 (RGBA) as ``[..., 3]``."""
    channels = images.shape[-1]
    if isinstance(channels, int):
        return images[..., (0, 0, 0)] if channels < 3 else images[..., :3]
    index = jnp.where(jnp.asarray(channels) < 3, 0, jnp.arange(3))
    return jnp.take(images, index, axis=-1)


def _round_half_even_half(value: jax.Array) -> jax.Array:
    """``round(value / 2)`` of a non-negative int array, ties to even (Python's ``round``)."""
    half = value // 2
    return half + (value % 2) * (half % 2)


def fit_weights(size, other, side: int) -> jax.Array:
    """float32 ``[side, size]``: one axis of :func:`msad_jax.data.images.fit_square`, bilinear."""
    size_v = jnp.asarray(size, jnp.int32)
    other_v = jnp.asarray(other, jnp.int32)
    resized = jnp.where(size_v <= other_v, side, (side * size_v) // other_v)
    start = _round_half_even_half(resized - side)
    scale = size_v.astype(jnp.float32) / resized.astype(jnp.float32)
    support = jnp.maximum(scale, 1.0)  # the bilinear support (1) stretched when shrinking
    center = (start.astype(jnp.float32) + jnp.arange(side, dtype=jnp.float32) + 0.5) * scale
    center = center[:, None]  # [side, 1]
    k = jnp.arange(size, dtype=jnp.float32)[None, :]  # [1, size]
    lo = jnp.maximum(jnp.trunc(center - support + 0.5), 0.0)
    hi = jnp.minimum(jnp.trunc(center + support + 0.5), size_v.astype(jnp.float32))
    inside = (k >= lo) & (k < hi)
    w = jnp.where(inside, _filter((k + 0.5 - center) / support, "bilinear", jnp), 0.0)
    return w / jnp.sum(w, axis=1, keepdims=True)


def fit_square_float(images: jax.Array, side: int) -> jax.Array:
    """float32 ``[..., side, side, C]``: :func:`fit_weights` on both axes of ``[..., H, W, C]``."""
    height, width = images.shape[-3], images.shape[-2]
    x = images.astype(jnp.float32)
    if isinstance(height, int) and isinstance(width, int) and height == width == side:
        return x
    wy = fit_weights(height, width, side)
    wx = fit_weights(width, height, side)
    x = jnp.einsum("qw,...hwc->...hqc", wx, x, precision=_PRECISION)
    return jnp.einsum("ph,...hqc->...pqc", wy, x, precision=_PRECISION)


def any_size_transform(images: jax.Array, side: int, prep: Preprocessing) -> jax.Array:
    """uint8 ``[b, H, W, C]`` of any size and channel count -> float32 ``[b, S, S, 3]``."""
    return eval_transform(fit_square_float(to_rgb(images), side), prep)


def make_any_size_preprocess_fn(side: int, prep: Preprocessing) -> Callable[[jax.Array], jax.Array]:
    """Returns :func:`any_size_transform` for ``side`` and ``prep`` (jit/pmap the caller)."""

    def preprocess(images: jax.Array) -> jax.Array:
        return any_size_transform(images, side, prep)

    return preprocess


def make_preprocess_fn(prep: Preprocessing) -> Callable[[jax.Array], jax.Array]:
    """Returns ``images_uint8 -> float32 [b, S, S, 3]`` (not jitted; jit/pmap the caller)."""

    def preprocess(images: jax.Array) -> jax.Array:
        return eval_transform(images, prep)

    return preprocess
