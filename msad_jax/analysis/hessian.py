"""Curvature of the contrastive losses w.r.t. the features of a small batch (SPEC §10).

The loss is invariant to each feature's norm, so the Hessian is restricted to the tangent space
of the product of spheres (the raw Hessian mixes radial directions with the gradient).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from msad_jax.analysis.conditioning import _loss_split, loss_shift
from msad_jax.losses import l2_normalize


def _loss_of_rows(center, shift, temperature: float, batch: int):
    """``rows [2B, D] -> scalar loss`` (view 1 rows then view 2 rows)."""

    def fn(rows: jax.Array) -> jax.Array:
        return _loss_split(rows[:batch], rows[batch:], center, shift, temperature=temperature).total

    return fn


def _unit_rows(feats1: jax.Array, feats2: jax.Array) -> jax.Array:
    if feats1.ndim != 2 or feats1.shape != feats2.shape:
        raise ValueError(
            f"expected two views [B, D] of equal shape, got {feats1.shape} and {feats2.shape}"
        )
    return l2_normalize(jnp.concatenate([feats1, feats2]))


def feature_hessian(
    feats1: jax.Array,
    feats2: jax.Array,
    center: jax.Array | None = None,
    *,
    loss: str,
    temperature: float = 0.25,
) -> jax.Array:
    """The full Hessian ``[2B D, 2B D]`` of the loss w.r.t. the flattened features at phi.

    Args:
      feats1: ``[B, D]`` view 1 (normalised here).
      feats2: ``[B, D]`` view 2.
      center: ``[D]`` center (needed for 'msc').
      loss: 'contrastive' or 'msc'.
      temperature: ``tau``.

    Returns:
      The symmetric Hessian.
    """
    shift = loss_shift(loss, center)
    rows = _unit_rows(feats1, feats2)
    return _full_hessian(rows, center, shift, temperature=temperature, batch=feats1.shape[0])


@functools.partial(jax.jit, static_argnames=("temperature", "batch"))
def _full_hessian(rows, center, shift, *, temperature, batch):
    fn = _loss_of_rows(center, shift, temperature, batch)
    return jax.hessian(lambda flat: fn(flat.reshape(rows.shape)))(rows.reshape(-1))


@functools.partial(jax.jit, static_argnames=("temperature", "batch"))
def _inside_hessian(coords, basis, center, shift, *, temperature, batch):
    """Hessian of the loss w.r.t. the coordinates ``[n, k]`` of the rows in ``basis``."""
    fn = _loss_of_rows(center, shift, temperature, batch)
    hi = jax.lax.Precision.HIGHEST
    return jax.hessian(
        lambda flat: fn(jnp.matmul(flat.reshape(coords.shape), basis.T, precision=hi))
    )(coords.reshape(-1))


@functools.partial(jax.jit, static_argnames=("temperature", "batch"))
def _outside_hessian(rows, w, center, shift, *, temperature, batch):
    """Hessian of ``t -> L(rows + t w^T)`` at ``t = 0`` (``[n, n]``)."""
    fn = _loss_of_rows(center, shift, temperature, batch)
    return jax.hessian(lambda t: fn(rows + t[:, None] * w[None, :]))(
        jnp.zeros(rows.shape[:1], rows.dtype)
    )


def _complement_basis(v: np.ndarray) -> np.ndarray:
    """Orthonormal basis ``[n, n - 1]`` of the hyperplane orthogonal to the unit vector ``v``."""
    # The left singular vectors of v (as a column) beyond the first span its complement.
    u, _, _ = np.linalg.svd(v.reshape(-1, 1), full_matrices=True)
    return u[:, 1:]


def tangent_basis(phi: np.ndarray) -> np.ndarray:
    """Orthonormal basis of the tangent space of the product of spheres at the unit rows ``phi``.

    Args:
      phi: ``[N, D]`` unit rows.

    Returns:
      float64 ``[N D, N (D - 1)]``, block diagonal: block ``i`` spans ``phi_i^perp``.
    """
    phi = np.asarray(phi, np.float64)
    n, d = phi.shape
    basis = np.zeros((n * d, n * (d - 1)))
    for i, row in enumerate(phi):
        basis[i * d : (i + 1) * d, i * (d - 1) : (i + 1) * (d - 1)] = _complement_basis(row)
    return basis


def tangent_eigenvalues(hessian: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Eigenvalues (descending) of a feature Hessian restricted to the tangent space at ``phi``.

    Args:
      hessian: ``[N D, N D]`` (e.g. :func:`feature_hessian`).
      phi: ``[N, D]`` the unit features it was evaluated at.

    Returns:
      float64 ``[N (D - 1)]``.
    """
    basis = tangent_basis(phi)
    restricted = basis.T @ np.asarray(hessian, np.float64) @ basis
    return np.linalg.eigvalsh(0.5 * (restricted + restricted.T))[::-1]


@dataclasses.dataclass(frozen=True)
class HessianSpectrum:
    """Spectrum of the tangent feature Hessian, with multiplicities.

    Attributes:
      eigenvalues: distinct computed eigenvalues, descending (float64).
      multiplicities: how often each occurs in the full spectrum.
      dimension: dimension of the tangent space, ``2B (D - 1)`` (= sum of multiplicities).
      span_rank: ``k``, dimension of the span of the features (and center).
      null_rtol: eigenvalues with ``|lambda| <= null_rtol * max |lambda|`` count as null.
    """

    eigenvalues: np.ndarray
    multiplicities: np.ndarray
    dimension: int
    span_rank: int
    null_rtol: float

    def all_eigenvalues(self) -> np.ndarray:
        """Every eigenvalue with its multiplicity, descending (``dimension`` values)."""
        return np.repeat(self.eigenvalues, self.multiplicities)

    @property
    def max_abs(self) -> float:
        """Largest ``|lambda|``."""
        return float(np.max(np.abs(self.eigenvalues)))

    def _non_null(self) -> np.ndarray:
        return np.abs(self.eigenvalues) > self.null_rtol * self.max_abs

    @property
    def num_null(self) -> int:
        """Number of (near-)null eigenvalues, with multiplicity."""
        return int(np.sum(self.multiplicities[~self._non_null()]))

    @property
    def num_negative(self) -> int:
        """Number of negative non-null eigenvalues, with multiplicity."""
        negative = (self.eigenvalues < 0) & self._non_null()
        return int(np.sum(self.multiplicities[negative]))

    @property
    def condition_number(self) -> float:
        """``max |lambda| / min |lambda|`` over the non-null eigenvalues."""
        kept = np.abs(self.eigenvalues[self._non_null()])
        if kept.size == 0:
            return float("nan")
        return float(kept.max() / kept.min())

    def top(self, count: int = 5) -> list[float]:
        """The ``count`` largest eigenvalues (with multiplicity), descending."""
        return [float(x) for x in self.all_eigenvalues()[:count]]

    def summary(self, top: int = 5) -> dict[str, float | int | list[float]]:
        """JSON-friendly numbers: top eigenvalues, smallest, condition number, counts."""
        return {
            "top_eigenvalues": self.top(top),
            "min_eigenvalue": float(self.eigenvalues[-1]),
            "condition_number": self.condition_number,
            "num_negative": self.num_negative,
            "num_null": self.num_null,
            "dimension": self.dimension,
        }


def _span_basis(vectors: np.ndarray, rtol: float = 1e-6) -> np.ndarray:
    """Orthonormal basis ``[D, k]`` of the span of the rows of ``vectors``."""
    u, s, _ = np.linalg.svd(vectors.T, full_matrices=False)
    return u[:, s > rtol * s[0]]


def hessian_spectrum(
    feats1: jax.Array,
    feats2: jax.Array,
    center: jax.Array | None = None,
    *,
    loss: str,
    temperature: float = 0.25,
    null_rtol: float = 1e-6,
    seed: int = 0,
) -> HessianSpectrum:
    """Spectrum of the tangent Hessian of the loss w.r.t. the features, at any ``D``.

    Args:
      feats1: ``[B, D]`` view 1 (the Hessian is taken at ``normalize(feats)``).
      feats2: ``[B, D]`` view 2.
      center: ``[D]`` center (needed for 'msc').
      loss: 'contrastive' or 'msc'.
      temperature: ``tau``.
      null_rtol: relative threshold below which an eigenvalue counts as null.
      seed: seed of the random direction in ``S^perp`` (the result does not depend on it).
    """
    shift = loss_shift(loss, center)
    rows = _unit_rows(feats1, feats2)
    n, d = rows.shape
    batch = feats1.shape[0]
    spanned = np.asarray(rows, np.float64)
    if center is not None:  # (also for 'contrastive': same shapes, one compilation for both)
        spanned = np.concatenate([spanned, np.asarray(center, np.float64)[None, :]])
    basis = _span_basis(spanned)
    k = basis.shape[1]
    options = {"temperature": temperature, "batch": batch}
    # (a) rows inside S: coordinates Y [n, k], feats = Y basis^T.
    basis_j = jnp.asarray(basis, rows.dtype)
    coords = jnp.matmul(rows, basis_j, precision=jax.lax.Precision.HIGHEST)
    inside = _inside_hessian(coords, basis_j, center, shift, **options)
    eigenvalues = [tangent_eigenvalues(np.asarray(inside), np.asarray(coords, np.float64))]
    multiplicities = [np.ones(n * (k - 1), dtype=np.int64)]
    # (b) rows along one direction w orthogonal to S: D - k copies of a [n, n] block.
    if d > k:
        w = np.random.default_rng(seed).standard_normal(d)
        w -= basis @ (basis.T @ w)
        w /= np.linalg.norm(w)
        outside = np.asarray(
            _outside_hessian(rows, jnp.asarray(w, rows.dtype), center, shift, **options), np.float64
        )
        eigenvalues.append(np.linalg.eigvalsh(0.5 * (outside + outside.T)))
        multiplicities.append(np.full(n, d - k, dtype=np.int64))
    values = np.concatenate(eigenvalues)
    counts = np.concatenate(multiplicities)
    order = np.argsort(-values, kind="stable")
    return HessianSpectrum(
        eigenvalues=values[order],
        multiplicities=counts[order],
        dimension=int(n * (d - 1)),
        span_rank=int(k),
        null_rtol=float(null_rtol),
    )
