"""CPU lowerings of the backbones' convolutions and max-pooling, for training speed on XLA:CPU.

XLA:CPU (jaxlib 0.10) runs the backward passes of some layers far below what the processor can do
(measured in ``benchmarks/RESULTS.md``):

* the weight gradient of a depthwise convolution (``feature_group_count`` = channels) becomes a
  *dense* convolution over all pairs of channels followed by a selection of its diagonal: C times
  the work (C = 96 .. 1152 in EfficientNet-Lite0), 5-25x slower than needed;
* the backward pass of max-pooling (``select_and_scatter``) is expanded into index bookkeeping
  (an iota, a reduce-window over (value, index) pairs and a scatter) that costs far more than the
  forward pass;
* YNNPACK, which runs convolutions by default, computes the weight gradients of dense
  convolutions 2-4x slower than Eigen (see :data:`msad_jax.cpu_flags.EIGEN_CONVOLUTIONS_FLAG`).

This module gives the same functions another lowering, chosen when a function is traced for the
CPU backend:

* depthwise convolutions: ``k*k`` shifted multiply-adds, which XLA fuses into one loop; the
  input gradient is the same on the (stride-dilated) output gradient with the kernel flipped,
  the weight gradient one reduction per tap (over chunks of the batch, in a loop: XLA:CPU
  materialises the shifted views a reduction reads, and the loop bounds their memory);
* 1x1 convolutions without padding: one matrix product over channels (of the strided input for
  stride 2), in float32 accumulation;
* max-pooling: the forward pass is XLA's ``reduce_window``; the backward pass (``custom_vjp``)
  gives each window's gradient to its first maximum in row-major order, XLA's own rule for ties,
  with ``k*k`` masked, padded adds;
* every other convolution stays ``lax.conv_general_dilated`` (run by Eigen under the XLA flag
  that ``import msad_jax`` sets, see :mod:`msad_jax.cpu_flags`).

Results equal the default lowering up to float rounding (the summation order differs); the tests
check values and gradients for every convolution shape of the backbones.

The switch: the environment variable ``MSAD_JAX_CPU_LOWERING`` (:mod:`msad_jax.cpu_flags`;
``0``/``false``/``no``/``off`` turns it off, ``python -m msad_jax.main --nocpu_lowering`` sets it).
It is read when a function is *traced*: a function already compiled keeps the lowering it was
traced with. Accelerator backends always get XLA's own lowering, and so do functions traced
inside :func:`xla_lowering` (``msad_jax.export`` traces there: an exported scorer holds XLA's
own convolutions, whatever machine exported it and for whichever platforms) and functions of
symbolic shapes.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from msad_jax import cpu_flags

Padding = tuple[tuple[int, int], ...]
_NHWC_HWIO = ("NHWC", "HWIO", "NHWC")


_XLA_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("xla_lowering", default=False)


@contextlib.contextmanager
def xla_lowering() -> Iterator[None]:
    """Functions traced inside get XLA's own lowering, whatever the backend and the switch.

    For code lowered for other platforms than the one tracing it (``jax.export``): the CPU
    lowering is chosen at trace time, from the default backend, and must not end up in a
    program meant for a GPU or TPU. A function JAX has already traced (and cached) for the same
    argument shapes keeps the lowering it was traced with.
    """
    token = _XLA_ONLY.set(True)
    try:
        yield
    finally:
        _XLA_ONLY.reset(token)


def active() -> bool:
    """Whether functions traced now get the CPU lowering.

    Yes when the switch is on (:func:`msad_jax.cpu_flags.switched_on`), the default backend is
    the CPU and no :func:`xla_lowering` context is open.
    """
    return not _XLA_ONLY.get() and cpu_flags.switched_on() and jax.default_backend() == "cpu"


def _static(*arrays: jax.Array) -> bool:
    """Whether every dimension is a known integer (not a ``jax.export`` symbolic dimension)."""
    return all(isinstance(d, int) for a in arrays for d in a.shape)


def _accumulation_dtype(dtype: Any) -> Any:
    """float32 for float32 and narrower floats (bfloat16, float16), float64 for float64."""
    return jnp.promote_types(dtype, jnp.float32)


def _output_size(size: int, window: int, stride: int, pad: tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - window) // stride + 1


def _window_taps(
    padded: jax.Array, window: tuple[int, int], strides: tuple[int, int], out: tuple[int, int]
) -> list[jax.Array]:
    """The ``kh*kw`` strided views of a padded NHWC array, row-major over the window."""
    n, _, _, c = padded.shape
    (kh, kw), (sh, sw), (oh, ow) = window, strides, out
    return [
        lax.slice(
            padded,
            (0, i, j, 0),
            (n, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, c),
            (1, sh, sw, 1),
        )
        for i in range(kh)
        for j in range(kw)
    ]


def _shifted_sum(
    padded: jax.Array, kernel: jax.Array, strides: tuple[int, int], out: tuple[int, int]
) -> jax.Array:
    """Sum over the window of each strided view of ``padded`` times its per-channel weight."""
    kh, kw = kernel.shape[:2]
    weights = kernel.reshape(kh * kw, -1)
    taps = _window_taps(padded, (kh, kw), strides, out)
    result = taps[0] * weights[0]
    for tap, weight in zip(taps[1:], weights[1:], strict=True):
        result = result + tap * weight
    return result


#: Upper bound on the bytes of the shifted views one step of the weight gradient's loop holds.
_VIEW_BYTES = 64 * 2**20


def _images_per_chunk(n: int, bytes_per_image: int) -> int:
    """Largest divisor of ``n`` whose chunk of images stays within :data:`_VIEW_BYTES`."""
    limit = max(1, _VIEW_BYTES // max(bytes_per_image, 1))
    return max(d for d in range(1, n + 1) if n % d == 0 and d <= limit)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(
    x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding
) -> jax.Array:
    with jax.named_scope("depthwise_conv"):
        kh, kw = kernel.shape[:2]
        out = (
            _output_size(x.shape[1], kh, strides[0], padding[0]),
            _output_size(x.shape[2], kw, strides[1], padding[1]),
        )
        dtype = _accumulation_dtype(x.dtype)
        padded = jnp.pad(x.astype(dtype), ((0, 0), *padding, (0, 0)))
        return _shifted_sum(padded, kernel.astype(dtype), strides, out).astype(x.dtype)


def _depthwise_fwd(x, kernel, strides, padding):
    return _depthwise(x, kernel, strides, padding), (x, kernel)


def _depthwise_input_gradient(g, kernel, strides, padding, size):
    """The depthwise convolution's input gradient (its transposed convolution).

    A stride-1 depthwise convolution of the output gradient, dilated by the stride and padded so
    that the result has the input's ``size``, with the kernel flipped: one fused loop, like the
    forward pass.
    """
    pads = [(0, 0, 0)]
    for length, k, s, (lo, hi) in zip(size, kernel.shape[:2], strides, padding, strict=True):
        rest = (length + lo + hi - k) % s  # input rows/columns no window reached
        pads.append((k - 1 - lo, k - 1 - hi + rest, s - 1))
    dilated = lax.pad(g, jnp.zeros((), g.dtype), (*pads, (0, 0, 0)))
    return _shifted_sum(dilated, kernel[::-1, ::-1], (1, 1), size)


def _depthwise_weight_gradient(x, g, window, strides, padding):
    """One reduction per tap of (shifted input view x output gradient), ``[kh*kw, C]``.

    XLA:CPU materialises the views its reductions read; looping over chunks of the batch
    (``lax.scan``) bounds them to :data:`_VIEW_BYTES` instead of ``kh*kw`` activations.
    """
    n, c = x.shape[0], x.shape[3]
    out = g.shape[1:3]
    taps = window[0] * window[1]
    chunk = _images_per_chunk(n, taps * out[0] * out[1] * c * x.dtype.itemsize)

    def step(total, chunk_xg):
        xc, gc = chunk_xg
        padded = jnp.pad(xc, ((0, 0), *padding, (0, 0)))
        views = _window_taps(padded, window, strides, out)
        return total + jnp.stack([jnp.sum(v * gc, axis=(0, 1, 2)) for v in views]), None

    chunks = (x.reshape(n // chunk, chunk, *x.shape[1:]), g.reshape(n // chunk, chunk, *out, c))
    total, _ = lax.scan(step, jnp.zeros((taps, c), x.dtype), chunks)
    return total


def _depthwise_bwd(strides, padding, residuals, g):
    x, kernel = residuals
    dtype = _accumulation_dtype(x.dtype)
    wide_x, g, wide_kernel = x.astype(dtype), g.astype(dtype), kernel.astype(dtype)
    with jax.named_scope("depthwise_conv_input_gradient"):
        dx = _depthwise_input_gradient(g, wide_kernel, strides, padding, x.shape[1:3])
    with jax.named_scope("depthwise_conv_weight_gradient"):
        dk = _depthwise_weight_gradient(wide_x, g, kernel.shape[:2], strides, padding)
    return dx.astype(x.dtype), dk.reshape(kernel.shape).astype(kernel.dtype)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def depthwise_conv(
    x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: Padding
) -> jax.Array:
    """Depthwise 2-D convolution as shifted multiply-adds.

    Equals ``lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=('NHWC',
    'HWIO', 'NHWC'), feature_group_count=C)`` up to rounding, accumulating in float32 (or
    float64). Its input gradient is again a sum of shifted views (of the dilated output
    gradient, with the kernel flipped), its weight gradient one reduction per tap, computed over
    chunks of the batch in a loop to bound memory.

    Args:
      x: input ``[N, H, W, C]``.
      kernel: ``[kh, kw, 1, C]``, one filter per channel.
      strides: ``(sh, sw)``.
      padding: ``((top, bottom), (left, right))``, zeros.

    Returns:
      ``[N, OH, OW, C]`` in ``x.dtype``.
    """
    strides = (int(strides[0]), int(strides[1]))
    padding = tuple((int(a), int(b)) for a, b in padding)
    return _depthwise(x, kernel, strides, padding)


def pointwise_conv(
    x: jax.Array, kernel: jax.Array, strides: Sequence[int], precision: Any = None
) -> jax.Array:
    """1x1 convolution without padding as one matrix product over channels.

    Args:
      x: input ``[N, H, W, Cin]``.
      kernel: ``[1, 1, Cin, Cout]``.
      strides: ``(sh, sw)``; the input is subsampled first.
      precision: passed to ``lax.dot_general``.

    Returns:
      ``[N, ceil(H / sh), ceil(W / sw), Cout]`` in the promoted input dtype.
    """
    sh, sw = int(strides[0]), int(strides[1])
    with jax.named_scope("pointwise_conv"):
        if (sh, sw) != (1, 1):
            x = x[:, ::sh, ::sw, :]
        dtype = jnp.promote_types(x.dtype, kernel.dtype)
        out = lax.dot_general(
            x,
            kernel[0, 0],
            (((3,), (0,)), ((), ())),
            precision=precision,
            preferred_element_type=_accumulation_dtype(dtype),
        )
        return out.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(
    x: jax.Array, window: tuple[int, int], strides: tuple[int, int], padding: Padding
) -> jax.Array:
    return _reduce_window_max(x, window, strides, padding)


def _reduce_window_max(
    x: jax.Array, window: tuple[int, int], strides: tuple[int, int], padding: Padding
) -> jax.Array:
    """XLA's max-pooling, as ``flax.linen.max_pool`` (JAX differentiates it)."""
    return lax.reduce_window(
        x, -jnp.inf, lax.max, (1, *window, 1), (1, *strides, 1), ((0, 0), *padding, (0, 0))
    )


def _max_pool_fwd(x, window, strides, padding):
    y = _max_pool(x, window, strides, padding)
    return y, (x, y)


def _max_pool_bwd(window, strides, padding, residuals, g):
    with jax.named_scope("max_pool_gradient"):
        return _max_pool_gradient(window, strides, padding, residuals, g)


def _max_pool_gradient(window, strides, padding, residuals, g):
    x, y = residuals
    (pt, pb), (pl, pr) = padding
    padded = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=-jnp.inf)
    hp, wp = padded.shape[1:3]
    (oh, ow), (sh, sw) = y.shape[1:3], strides
    taps = _window_taps(padded, window, strides, (oh, ow))
    free = jnp.ones(y.shape, bool)  # windows whose maximum has not been met yet
    zero = jnp.zeros((), g.dtype)
    grad = None
    for index, tap in enumerate(taps):
        i, j = divmod(index, window[1])
        first = free & (tap == y)
        free = free & ~first
        # Put the window's gradient back at padded position (i + sh*a, j + sw*b).
        placed = lax.pad(
            jnp.where(first, g, zero),
            zero,
            (
                (0, 0, 0),
                (i, hp - i - (oh - 1) * sh - 1, sh - 1),
                (j, wp - j - (ow - 1) * sw - 1, sw - 1),
                (0, 0, 0),
            ),
        )
        grad = placed if grad is None else grad + placed
    return (grad[:, pt : hp - pb, pl : wp - pr, :],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(
    x: jax.Array,
    window: Sequence[int],
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
) -> jax.Array:
    """2-D max-pooling of NHWC input, padded with -inf, like ``flax.linen.max_pool``.

    On the CPU lowering the gradient is computed with masked, padded adds (first maximum of each
    window in row-major order), otherwise by JAX's ``select_and_scatter``; same values.

    Args:
      x: ``[N, H, W, C]``.
      window: ``(kh, kw)``.
      strides: ``(sh, sw)``.
      padding: ``((top, bottom), (left, right))``.
    """
    window = (int(window[0]), int(window[1]))
    strides = (int(strides[0]), int(strides[1]))
    padding = tuple((int(a), int(b)) for a, b in padding)
    if _static(x) and active():
        return _max_pool(x, window, strides, padding)
    return _reduce_window_max(x, window, strides, padding)


def _explicit_padding(padding: Any) -> Padding | None:
    if isinstance(padding, str):
        return None
    return tuple((int(a), int(b)) for a, b in padding)


def _is_nhwc_hwio(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any) -> bool:
    if lhs.ndim != 4 or rhs.ndim != 4:
        return False
    wanted = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC_HWIO)
    given = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    return given == wanted


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """``lax.conv_general_dilated`` with the CPU lowering of depthwise and 1x1 convolutions.

    Same signature and results (up to rounding). Takes the CPU lowering when :func:`active`, the
    layout is NHWC/HWIO, the padding explicit, nothing dilated and no ``preferred_element_type``
    is asked for and every dimension is static; everything else goes to
    ``lax.conv_general_dilated``. Pass it to
    ``flax.linen.Conv(conv_general_dilated=...)``.
    """
    pads = _explicit_padding(padding)
    plain = (
        pads is not None
        and len(pads) == 2
        and tuple(lhs_dilation or (1, 1)) == (1, 1)
        and tuple(rhs_dilation or (1, 1)) == (1, 1)
        and batch_group_count == 1
        and preferred_element_type is None
        and _static(lhs, rhs)
        and _is_nhwc_hwio(lhs, rhs, dimension_numbers)
    )
    if plain and active():
        kh, kw, group_in, out = rhs.shape
        channels = lhs.shape[3]
        if feature_group_count == channels == out and group_in == 1 and channels > 1:
            return depthwise_conv(lhs, rhs, window_strides, pads)
        if feature_group_count == 1 and (kh, kw) == (1, 1) and pads == ((0, 0), (0, 0)):
            return pointwise_conv(lhs, rhs, window_strides, precision)
    return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
