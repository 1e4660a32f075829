"""MoCo-v2 training augmentation on device (SPEC §6), one PRNG key per example.

Pipeline, in torchvision's order, each image independently::

    RandomResizedCrop(S, scale=(0.2, 1), ratio=(3/4, 4/3), bilinear)
    RandomApply(ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1), p=0.8)
    RandomGrayscale(p=0.2)
    RandomApply(GaussianBlur(sigma ~ U[0.1, 2.0]), p=0.5)
    RandomHorizontalFlip(p=0.5)
    ToTensor + Normalize(prep.mean, prep.std)

The random decisions are drawn first (:func:`sample_augment_params`, a pytree of per-example
numbers and flags) and then applied (:func:`apply_augment_params`); :func:`train_augment` is
exactly ``apply(sample(key))`` per example, so tests can check the sampling distribution and the
image operations separately. Everything has static shapes and jits/vmaps; an optional operation
that was not drawn runs with identity parameters (see :func:`apply_augment_params`).

Where each operation comes from (dm-pix 0.4.5 was checked op by op against torchvision):

- RandomResizedCrop parameters: hand-written (dm-pix has no equivalent). torchvision's sampler:
  10 attempts of (area fraction ~ U[0.2, 1], log aspect ratio ~ U[log 3/4, log 4/3]),
  ``w = round(sqrt(area * r))``, ``h = round(sqrt(area / r))``, the first attempt that fits wins,
  top/left uniform integers; if none fits, the central crop clamped to the ratio range. The 10
  attempts are drawn at once and the first valid one selected, so the loop has a fixed size.
- Crop + resize: hand-written. Pillow's antialiased bilinear filter, built as two weight matrices
  from the traced crop box (``msad_jax.data.transforms``), so crop and resize are one separable
  resampling per image (no dynamic shapes, no resize-of-crop). The horizontal flip is folded into
  the column weights (reversed rows): every later operation commutes with a mirror (per-pixel
  colour ops, the global mean of contrast, the symmetric blur with symmetric padding), so this
  equals flipping at the end, as torchvision does.
- Brightness: hand-written; torchvision multiplies by a factor and clamps
  (``pix.adjust_brightness`` adds a delta: different).
- Contrast: hand-written; torchvision blends with the mean of the grayscale image, a scalar,
  and clamps (``pix.adjust_contrast`` uses per-channel means and does not clamp: different).
- Saturation: hand-written; torchvision blends with the grayscale image and clamps
  (``pix.adjust_saturation`` scales S in HSV: different).
- Hue: ``pix.adjust_hue`` (RGB -> HSV, ``h = (h + delta) mod 1``, back), torchvision's tensor
  semantics.
- Grayscale (also inside contrast and saturation): hand-written as a weighted sum of the planes
  with ``pix.rgb_to_grayscale``'s rec601 weights (0.2989, 0.587, 0.114), which are torchvision's;
  ``pix.rgb_to_grayscale(channel_axis=0)`` gives the same numbers but its tensordot was about 2x
  slower under vmap on CPU.
- Gaussian blur: hand-written separable 13-tap convolution with edge-replicating borders; the
  kernel is built exactly as ``pix.gaussian_blur`` builds it (``exp(-x^2 / 2 sigma^2)``,
  normalised). ``pix.gaussian_blur`` itself does not fit: its 'SAME' padding is zero padding
  (darkens borders; 'VALID' on a pre-padded image would work), and under vmap with a per-example
  sigma its convolution becomes a grouped convolution that ran about 4x slower on CPU than the 13
  shifted multiply-adds. MoCo v2 blurs with PIL's ``ImageFilter.GaussianBlur(radius=sigma)``,
  which replicates edge pixels (hence edge padding) and approximates the Gaussian by repeated box
  blurs; here the Gaussian is exact, truncated at radius 6 = 3 * sigma_max (99.7% of the mass at
  sigma = 2, float-exact for small sigma), fixed so the shape is static.
- Flip: folded into the crop weights (see above); ``pix.flip_left_right`` would do the same.
- Colour jitter order: a random permutation of the four operations per example, like
  ``torch.randperm(4)``. The three blends (brightness, contrast, saturation) are cheap and the
  hue shift is not, so the permutation is applied as three blend slots, the hue shift, three
  blend slots: a blend slot whose operation is not at that position uses factor 1 (identity).
  Each operation runs exactly once, in permutation order, with one HSV round trip per image.

Values: float32 in [0, 1] between operations (clamped like torchvision's float tensors), never
rounded to 8 bits (Pillow rounds; the distributions match, bits do not: SPEC §6 asks for the
distribution).
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
    """Draws the MoCo-v2 decisions for one image of static size ``height x width``.

    All randomness comes from one vector of independent U[0, 1) numbers (one PRNG call, which
    compiles much faster than a dozen): crop draws, then the flags and factors, then four numbers
    whose argsort is the uniformly random jitter order.
    """
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

    Pillow's antialiased bilinear resampling of the crop (what torchvision's ``resized_crop`` does
    on PIL images), as one separable resampling with weights built from the traced box.

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
    """Luma ``[1, H, W]`` of ``[3, H, W]``: rec601 weights, as ``pix.rgb_to_grayscale``.

    The weights (0.2989, 0.587, 0.114) are torchvision's and dm-pix's; the sum of planes is
    written out because ``pix.rgb_to_grayscale(channel_axis=0)`` (a tensordot) was about 2x
    slower under vmap on CPU.
    """
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
    """Gaussian blur of ``[C, H, W]`` with edge-replicating borders (see module doc)."""
    return separable_blur(image, blur_kernel(sigma))


_IDENTITY_KERNEL = tuple(float(t == BLUR_KERNEL_SIZE // 2) for t in range(BLUR_KERNEL_SIZE))


def apply_augment_params(image: jax.Array, params: AugmentParams, prep: Preprocessing) -> jax.Array:
    """Applies the decisions ``params`` to one uint8 image ``[H, W, 3]``.

    An operation that was not drawn runs with identity parameters (factors 1, hue shift 0,
    grayscale weight 0, a one-tap blur kernel) instead of being computed and discarded by a
    select: this is exact except the zero hue shift, an HSV round trip (error ~1e-7), and more
    than twice as fast on CPU (XLA fused the selects into the blur's 13 shifted reads).

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
    """Returns ``(keys [b], images_uint8 [b, H, W, 3]) -> float32 [b, S, S, 3]``.

    The form the training step takes (one key per example, see
    :func:`msad_jax.train_step.example_keys`). Not jitted: jit or pmap the caller.
    """
    return functools.partial(augment_examples, prep=prep)
