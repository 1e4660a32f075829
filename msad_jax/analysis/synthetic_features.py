"""Synthetic "pretrained" features: one class in a narrow cone, two views per image."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from msad_jax.losses import l2_normalize


class ConeFeatures(NamedTuple):
    """Two views of synthetic features in a cone.

    Attributes:
      phi1: ``[B, D]`` unit features of view 1.
      phi2: ``[B, D]`` unit features of view 2.
      center: ``[D]`` population mean of phi (``cosine * axis``).
      axis: ``[D]`` unit cone axis.
    """

    phi1: jax.Array
    phi2: jax.Array
    center: jax.Array
    axis: jax.Array


def cone_features(
    key: jax.Array,
    batch_size: int,
    dim: int,
    *,
    cosine: float = 0.86,
    view_noise: float = 0.05,
) -> ConeFeatures:
    """Draws two views of ``batch_size`` images whose features all have ``cosine`` to the axis.

    Args:
      key: PRNG key.
      batch_size: number of images ``B``.
      dim: feature dimension ``D >= 3``.
      cosine: cosine of every feature to the cone axis, in (-1, 1).
      view_noise: relative perturbation between the two views of an image (>= 0).

    Returns:
      The :class:`ConeFeatures` (float32).
    """
    if not -1.0 < cosine < 1.0:
        raise ValueError(f"cosine must lie in (-1, 1), got {cosine}")
    if dim < 3 or batch_size < 1:
        raise ValueError(f"need dim >= 3 and batch_size >= 1, got dim={dim}, batch={batch_size}")
    if view_noise < 0:
        raise ValueError(f"view_noise must be >= 0, got {view_noise}")
    k_axis, k_images, k_view1, k_view2 = jax.random.split(key, 4)
    axis = l2_normalize(jax.random.normal(k_axis, (dim,)))

    def orthogonal(x: jax.Array) -> jax.Array:
        return x - (x @ axis)[..., None] * axis

    directions = l2_normalize(orthogonal(jax.random.normal(k_images, (batch_size, dim))))
    radius = jnp.sqrt(1.0 - cosine**2)

    def view(key: jax.Array) -> jax.Array:
        noise = orthogonal(jax.random.normal(key, (batch_size, dim))) / jnp.sqrt(dim)
        v = l2_normalize(orthogonal(directions + view_noise * noise))
        return cosine * axis + radius * v

    return ConeFeatures(phi1=view(k_view1), phi2=view(k_view2), center=cosine * axis, axis=axis)
