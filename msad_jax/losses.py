"""Contrastive losses of Mean-Shifted Contrastive anomaly detection (SPEC §4 and §10).

NT-Xent treats all ``2B`` vectors of a two-view batch as anchors and splits exactly into alignment
and uniformity terms. An optional boolean ``mask`` marks padding, which is neither anchor nor
negative, so a padded batch has the loss of the unpadded one. :func:`nt_xent_rows` scores a subset
of anchors against all candidates (the multi-device step evaluates its local anchors with it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSSES = ("msc", "contrastive")
"""The losses a run can train with (``config.loss``): MSC, or standard NT-Xent on phi."""

# Logit given to excluded pairs (the anchor itself, padded candidates). Finite, so rows in which
# every candidate is excluded stay finite (and NaN-free under differentiation); exp() of it is 0.
_EXCLUDED_LOGIT = -1e30


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Divides each row by its L2 norm, as ``torch.nn.functional.normalize``.

    The clamp is on the squared norm, which keeps the gradient of an all-zero row finite.

    Args:
      x: array ``[..., D]``.
      eps: lower bound on the norm.

    Returns:
      Array of the same shape and dtype as ``x`` with unit-norm rows (rows of norm < eps are
      scaled by ``1/eps``).
    """
    squared = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    norm = jnp.sqrt(jnp.maximum(squared, jnp.asarray(eps * eps, dtype=squared.dtype)))
    return x / norm


def nt_xent_rows(
    anchors: jax.Array,
    candidates: jax.Array,
    self_index: jax.Array,
    positive_index: jax.Array,
    candidate_mask: jax.Array | None = None,
    temperature: float = 0.25,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-anchor NT-Xent terms of a set of anchors against a set of candidates.

    The loss is computed as ``logsumexp(s_j - s_p)``, never forming the two large terms it is the
    difference of (better conditioned for nearly collinear vectors); ``align + uniform == loss``.

    Args:
      anchors: ``[A, D]`` float array.
      candidates: ``[C, D]`` all vectors of the (global) batch.
      self_index: ``[A]`` integer row of each anchor within ``candidates``.
      positive_index: ``[A]`` integer row of each anchor's positive within ``candidates``.
      candidate_mask: optional ``[C]`` bool; False removes the candidate from every denominator.
      temperature: softmax temperature ``tau``.

    Returns:
      ``(align, uniform, loss)``, each ``[A]`` float.
    """
    hi = jax.lax.Precision.HIGHEST
    logits = jnp.matmul(anchors, candidates.T, precision=hi) / temperature
    columns = jnp.arange(candidates.shape[0])
    keep = columns[None, :] != self_index[:, None]
    if candidate_mask is not None:
        keep = keep & candidate_mask[None, :]
    excluded = jnp.asarray(_EXCLUDED_LOGIT, dtype=logits.dtype)
    positive = jnp.take_along_axis(logits, positive_index[:, None], axis=1)
    uniform = jax.nn.logsumexp(jnp.where(keep, logits, excluded), axis=-1)
    loss = jax.nn.logsumexp(jnp.where(keep, logits - positive, excluded), axis=-1)
    return -positive[:, 0], uniform, loss


def _two_view_rows(
    z1: jax.Array, z2: jax.Array, mask: jax.Array | None, temperature: float
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Per-anchor terms of a two-view batch: (align, uniform, loss, anchor_mask) over 2B rows."""
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(
            f"expected two views of equal shape [B, D], got {z1.shape} and {z2.shape}; "
            "pass the features of view 1 and view 2 of the same images"
        )
    batch = z1.shape[0]
    if mask is None:
        mask = jnp.ones((batch,), dtype=bool)
    mask = jnp.asarray(mask, dtype=bool)
    if mask.shape != (batch,):
        raise ValueError(f"mask must have shape ({batch},) to match the views, got {mask.shape}")
    z = jnp.concatenate([z1, z2], axis=0)
    rows = jnp.arange(2 * batch)
    anchor_mask = jnp.concatenate([mask, mask], axis=0)
    align, uniform, loss = nt_xent_rows(
        z, z, rows, (rows + batch) % (2 * batch), anchor_mask, temperature=temperature
    )
    return align, uniform, loss, anchor_mask


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``values`` over the entries where ``mask`` is True (0 when none are).

    Args:
      values: ``[N]`` float.
      mask: ``[N]`` bool.
    """
    zero = jnp.zeros_like(values)
    count = jnp.maximum(jnp.sum(mask.astype(values.dtype)), 1)
    # Two passes: the second sums the (small) deviations from the first estimate, which removes
    # most of the float32 rounding error of summing many similar values. Gradient: 1/count.
    first = jax.lax.stop_gradient(jnp.sum(jnp.where(mask, values, zero)) / count)
    return first + jnp.sum(jnp.where(mask, values - first, zero)) / count


def align_uniform_terms(
    z1: jax.Array,
    z2: jax.Array,
    temperature: float = 0.25,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Splits NT-Xent on ``z = [z1; z2]`` into its alignment and uniformity terms (SPEC §10).

    Args:
      z1: ``[B, D]`` first view.
      z2: ``[B, D]`` second view (row b is the positive of row b of ``z1``).
      temperature: ``tau``.
      mask: optional ``[B]`` bool, False for padding.

    Returns:
      ``(align, uniform)`` scalars.
    """
    align, uniform, _, anchor_mask = _two_view_rows(z1, z2, mask, temperature)
    return masked_mean(align, anchor_mask), masked_mean(uniform, anchor_mask)


def _nt_xent(z1: jax.Array, z2: jax.Array, temperature: float, mask: jax.Array | None):
    """NT-Xent mean over valid anchors of already normalised views."""
    _, _, loss, anchor_mask = _two_view_rows(z1, z2, mask, temperature)
    return masked_mean(loss, anchor_mask)


def contrastive_loss(
    z1: jax.Array,
    z2: jax.Array,
    temperature: float = 0.25,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Standard contrastive (NT-Xent / SimCLR) loss on the normalised views.

    Args:
      z1: ``[B, D]`` features of the first view (normalised inside).
      z2: ``[B, D]`` features of the second view (normalised inside).
      temperature: ``tau`` (0.25 in MSC).
      mask: optional ``[B]`` bool, False for padding.

    Returns:
      Scalar loss; ``log(2B - 1)`` for a fully collapsed batch.
    """
    return _nt_xent(l2_normalize(z1), l2_normalize(z2), temperature, mask)


def mean_shift(phi: jax.Array, center: jax.Array) -> jax.Array:
    """Mean-shifted, re-normalised feature: ``theta = normalize(phi - c)``."""
    return l2_normalize(phi - center)


def mean_shifted_contrastive_loss(
    phi1: jax.Array,
    phi2: jax.Array,
    center: jax.Array,
    temperature: float = 0.25,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Mean-shifted contrastive loss: NT-Xent on ``theta = normalize(phi - c)``.

    Args:
      phi1: ``[B, D]`` unit-norm features of the first view.
      phi2: ``[B, D]`` unit-norm features of the second view.
      center: ``[D]`` center of the normal features (unit-norm only when the angular term is used).
      temperature: ``tau``.
      mask: optional ``[B]`` bool, False for padding.
    """
    return _nt_xent(mean_shift(phi1, center), mean_shift(phi2, center), temperature, mask)


def angular_center_loss(
    phi1: jax.Array,
    phi2: jax.Array,
    center: jax.Array,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Angular center term: ``mean_b ||phi1_b - c||^2 + mean_b ||phi2_b - c||^2`` (SPEC §4).

    Args:
      phi1: ``[B, D]`` features of the first view.
      phi2: ``[B, D]`` features of the second view.
      center: ``[D]`` unit-norm center.
      mask: optional ``[B]`` bool, False for padding.
    """
    if phi1.shape != phi2.shape or phi1.ndim != 2:
        raise ValueError(
            f"expected two views [B, D] of equal shape, got {phi1.shape}, {phi2.shape}"
        )
    if mask is None:
        mask = jnp.ones((phi1.shape[0],), dtype=bool)
    d1 = jnp.sum(jnp.square(phi1 - center), axis=-1)
    d2 = jnp.sum(jnp.square(phi2 - center), axis=-1)
    return masked_mean(d1, mask) + masked_mean(d2, mask)
