"""The conditioning argument of MSC as functions to differentiate (SPEC §1, §10).

Pretrained features of one class sit in a narrow cone around their center. The standard NT-Xent
loss on phi then starts far from the optimum of its *uniformity* term, whose gradient pushes every
feature away from the center; the *alignment* term (pulling two views of an image together) is
comparatively weak. MSC computes the same loss on ``theta = normalize(phi - c)``, around which the
normal features are already spread out, so alignment and uniformity are balanced. This module
measures that with ``jax.grad``/``jax.jvp``; :mod:`msad_jax.analysis.hessian` adds the curvature.

Conventions used throughout:

* ``feats1``, ``feats2``: ``[B, D]`` backbone outputs of two views of the same ``B`` images (row
  ``b`` of each is the same image). They may have any norm: every function normalises them to
  ``phi = feats / ||feats||`` first, exactly as the training step does, so gradients "w.r.t. the
  features" are gradients w.r.t. the backbone output (the quantity back-propagated into the
  network). At unit-norm inputs that gradient is the tangential part of the gradient w.r.t. phi.
* ``loss``: ``'contrastive'`` (NT-Xent on ``z = phi``) or ``'msc'`` (NT-Xent on
  ``z = theta = normalize(phi - c)`` with the center ``c``, SPEC §4), the names of
  ``config.loss``. Inside jitted code the choice is a traced number,
  ``z = normalize(phi - shift * c)`` with ``shift`` 0 or 1 (:func:`loss_shift`), so one
  compilation serves both losses.
* ``center``: the center of the normal features as the training step gets it (the mean of phi,
  norm below 1; unit norm only with the angular term). Compactness always uses its direction.
* NT-Xent splits exactly into ``align = -(1/2B) sum_i z_i.z_p(i) / tau`` and
  ``uniform = (1/2B) sum_i log sum_{j != i} exp(z_i.z_j / tau)`` (the split of
  :func:`msad_jax.losses.align_uniform_terms`).
* Gradient sizes are global L2 norms over the whole array or pytree; the balance of two gradients
  is their norms, the ratio ``||grad uniform|| / ||grad align||`` and the cosine between them.

Exact property (tested): ``d theta / d phi = (I - theta theta^T) / ||phi - c||``, so the gradient of
the MSC loss w.r.t. phi is orthogonal to ``phi - c``: the loss sees only the direction of each
feature from the center, never its distance. (Once projected onto the unit sphere that phi lives
on, the gradient can still change the cosine to the center: the radial drift measures that.)

The radial drift: the first-order change of compactness (mean cosine of phi to the center
direction, over a fixed set of images) caused by ONE optimiser step,
``d/de compactness(params + e * delta) at e = 0`` with the update direction
``delta = -lr * (g + wd * p)`` for trainable parameters ``p`` (``g`` = gradient of the batch loss,
alignment + uniformity) and ``delta = 0`` for frozen ones: exactly the SGD step of
:func:`msad_jax.optimizer.make_optimizer` (SPEC §5). Negative drift = the step spreads the class
away from its center (what the standard loss does), computed with one ``jax.jvp``.

The command ``python -m msad_jax.analysis.conditioning --config ... --workdir ...`` trains with both
losses side by side and records all of this every epoch (:mod:`msad_jax.analysis.study`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from msad_jax.losses import LOSSES, align_uniform_terms, l2_normalize, mean_shift
from msad_jax.optimizer import combine, make_optimizer, partition

PyTree = Any


class LossSplit(NamedTuple):
    """The two terms of NT-Xent on one two-view batch (scalars)."""

    align: jax.Array
    uniform: jax.Array

    @property
    def total(self) -> jax.Array:
        """The loss itself, ``align + uniform``."""
        return self.align + self.uniform


class GradientBalance(NamedTuple):
    """Sizes of the alignment and uniformity gradients and how they relate (scalars).

    Attributes:
      align_norm: ``||grad L_align||`` (global L2).
      uniform_norm: ``||grad L_unif||``.
      cosine: cosine between the two gradients (-1: they oppose each other).
      ratio: ``uniform_norm / align_norm`` (> 1: uniformity dominates; inf if alignment is 0).
    """

    align_norm: jax.Array
    uniform_norm: jax.Array
    cosine: jax.Array
    ratio: jax.Array


class ParameterGradients(NamedTuple):
    """Gradients of the two loss terms w.r.t. the parameters, and what they were computed from.

    Attributes:
      align: gradient pytree of ``L_align`` (same structure as the params; zeros where frozen).
      uniform: gradient pytree of ``L_unif``.
      features: ``[2B, D]`` backbone outputs of view 1 then view 2 (float32).
      split: the loss terms on these features.
    """

    align: PyTree
    uniform: PyTree
    features: jax.Array
    split: LossSplit


def _float(x: jax.Array) -> jax.Array:
    """``x`` as a float array of at least float32 precision (float64 stays float64)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def check_loss(loss: str, center: jax.Array | None) -> None:
    """Raises ValueError for an unknown loss name or MSC without a center."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")
    if loss == "msc" and center is None:
        raise ValueError("loss='msc' needs the center of the normal features (center=...)")


def _check_views(feats1: jax.Array, feats2: jax.Array) -> None:
    if feats1.ndim != 2 or feats1.shape != feats2.shape:
        raise ValueError(
            f"expected two views [B, D] of equal shape, got {feats1.shape} and {feats2.shape}; "
            "row b of each must be a view of the same image"
        )


def unit_center(center: jax.Array) -> jax.Array:
    """The center's direction ``c / ||c||`` (``[D]``)."""
    return l2_normalize(_float(center))


@jax.jit
def compactness(phi: jax.Array, center: jax.Array) -> jax.Array:
    """Mean cosine between the features and the center direction (SPEC §10).

    Args:
      phi: ``[N, D]`` features (normalised here, so raw backbone outputs are fine).
      center: ``[D]`` center (only its direction matters).

    Returns:
      Scalar in [-1, 1]; 1 = every feature on the center's ray. With the features' own mean as
      the center it equals ``||mean phi||``.
    """
    phi = l2_normalize(_float(phi))
    if phi.ndim != 2 or phi.shape[-1] != jnp.shape(center)[-1]:
        raise ValueError(
            f"compactness needs phi [N, D] and center [D], got {phi.shape} and {jnp.shape(center)}"
        )
    cosines = jnp.matmul(phi, unit_center(center), precision=jax.lax.Precision.HIGHEST)
    return jnp.mean(cosines)


@functools.partial(jax.jit, static_argnames=("t",))
def uniformity(u: jax.Array, t: float = 2.0) -> jax.Array:
    """Wang & Isola's uniformity ``log mean_{i != j} exp(-t ||u_i - u_j||^2)``.

    Computed with log-sum-exp over the ``N (N - 1)`` ordered pairs (``N^2`` memory: pass at most a
    few thousand rows). For unit vectors it lies in ``[-4t, 0]``: 0 = all vectors equal, and
    about ``-2t`` when they are spread uniformly over a high-dimensional sphere.

    Args:
      u: ``[N, D]`` vectors, used as given (pass phi or theta), ``N >= 2``.
      t: the scale (2 in the paper).

    Returns:
      Scalar.
    """
    u = _float(u)
    if u.ndim != 2 or u.shape[0] < 2:
        raise ValueError(f"uniformity needs at least two vectors [N >= 2, D], got {u.shape}")
    n = u.shape[0]
    squared = jnp.sum(jnp.square(u), axis=-1)
    gram = jnp.matmul(u, u.T, precision=jax.lax.Precision.HIGHEST)
    distances = jnp.maximum(squared[:, None] + squared[None, :] - 2.0 * gram, 0.0)
    off_diagonal = ~jnp.eye(n, dtype=bool)
    logits = jnp.where(off_diagonal, -t * distances, -jnp.inf)
    return jax.nn.logsumexp(logits) - math.log(n * (n - 1))


def embed(phi: jax.Array, center: jax.Array | None, loss: str) -> jax.Array:
    """The vectors NT-Xent sees: ``phi`` (contrastive) or ``normalize(phi - c)`` (msc).

    Args:
      phi: ``[N, D]`` unit-norm features.
      center: ``[D]`` center (unused for 'contrastive').
      loss: 'contrastive' or 'msc'.

    Returns:
      ``[N, D]`` unit vectors.
    """
    check_loss(loss, center)
    if loss == "msc":
        return mean_shift(phi, jnp.asarray(center, phi.dtype))
    return phi


def loss_shift(loss: str, center: jax.Array | None = None) -> float:
    """The loss as a number: ``z = normalize(phi - shift * c)``, 0 = contrastive, 1 = msc.

    For unit phi, ``normalize(phi - 0 * c) = phi``: both losses are one function of a traced
    ``shift``, so jitted code compiles once for both (the private ``_*`` functions take it).

    Raises:
      ValueError: for an unknown loss, or 'msc' without a center.
    """
    check_loss(loss, center)
    return 1.0 if loss == "msc" else 0.0


def _shifted(phi: jax.Array, center: jax.Array | None, shift: jax.Array | float) -> jax.Array:
    """``normalize(phi - shift * center)`` (phi itself without a center)."""
    if center is None:
        return phi
    return l2_normalize(phi - shift * _float(center).astype(phi.dtype))


@functools.partial(jax.jit, static_argnames=("temperature",))
def _loss_split(feats1, feats2, center, shift, *, temperature: float) -> LossSplit:
    z1 = _shifted(l2_normalize(_float(feats1)), center, shift)
    z2 = _shifted(l2_normalize(_float(feats2)), center, shift)
    align, uniform = align_uniform_terms(z1, z2, temperature=temperature)
    return LossSplit(align=align, uniform=uniform)


def loss_split(
    feats1: jax.Array,
    feats2: jax.Array,
    center: jax.Array | None = None,
    *,
    loss: str,
    temperature: float = 0.25,
) -> LossSplit:
    """Alignment and uniformity terms of the standard or the MSC loss of a two-view batch.

    ``split.total`` equals :func:`msad_jax.losses.contrastive_loss` (contrastive) or
    :func:`msad_jax.losses.mean_shifted_contrastive_loss` (msc) on the same features.

    Args:
      feats1: ``[B, D]`` backbone outputs (or phi) of view 1.
      feats2: ``[B, D]`` of view 2.
      center: ``[D]`` center (needed for 'msc').
      loss: 'contrastive' or 'msc'.
      temperature: ``tau``.

    Returns:
      The :class:`LossSplit`.
    """
    _check_views(feats1, feats2)
    shift = loss_shift(loss, center)
    return _loss_split(feats1, feats2, center, shift, temperature=temperature)


@functools.partial(jax.jit, static_argnames=("temperature",))
def _feature_gradients(feats1, feats2, center, shift, *, temperature: float):
    b = feats1.shape[0]

    def terms(feats: jax.Array) -> jax.Array:
        split = _loss_split(feats[:b], feats[b:], center, shift, temperature=temperature)
        return jnp.stack([split.align, split.uniform])

    jacobian = jax.jacrev(terms)(_float(jnp.concatenate([feats1, feats2])))
    return jacobian[0], jacobian[1]


def feature_gradients(
    feats1: jax.Array,
    feats2: jax.Array,
    center: jax.Array | None = None,
    *,
    loss: str,
    temperature: float = 0.25,
) -> tuple[jax.Array, jax.Array]:
    """Gradients of ``L_align`` and ``L_unif`` w.r.t. the stacked features ``[feats1; feats2]``.

    The features are normalised inside, so the gradients are those w.r.t. the backbone output;
    each is orthogonal (row by row) to its feature.

    Args:
      feats1: ``[B, D]`` view 1.
      feats2: ``[B, D]`` view 2.
      center: ``[D]`` center (needed for 'msc').
      loss: 'contrastive' or 'msc'.
      temperature: ``tau``.

    Returns:
      ``(grad_align, grad_uniform)``, each ``[2B, D]`` (view 1 rows first).
    """
    _check_views(feats1, feats2)
    shift = loss_shift(loss, center)
    return _feature_gradients(feats1, feats2, center, shift, temperature=temperature)


@jax.jit
def gradient_balance(grad_align: PyTree, grad_uniform: PyTree) -> GradientBalance:
    """Norms, ratio and cosine of two gradients (arrays or pytrees of the same structure).

    Args:
      grad_align: gradient of the alignment term.
      grad_uniform: gradient of the uniformity term.

    Returns:
      The :class:`GradientBalance`.
    """
    align_norm = optax.tree.norm(grad_align)
    uniform_norm = optax.tree.norm(grad_uniform)
    dot = optax.tree.vdot(grad_align, grad_uniform)
    tiny = jnp.asarray(1e-30, jnp.float32)
    cosine = dot / jnp.maximum(align_norm * uniform_norm, tiny)
    return GradientBalance(
        align_norm=align_norm,
        uniform_norm=uniform_norm,
        cosine=cosine,
        ratio=uniform_norm / align_norm,
    )


def feature_gradient_balance(
    feats1: jax.Array,
    feats2: jax.Array,
    center: jax.Array | None = None,
    *,
    loss: str,
    temperature: float = 0.25,
) -> GradientBalance:
    """:func:`gradient_balance` of :func:`feature_gradients` (w.r.t. the backbone output)."""
    return gradient_balance(
        *feature_gradients(feats1, feats2, center, loss=loss, temperature=temperature)
    )


@jax.jit
def _positive_cosine(feats1, feats2, center, shift) -> jax.Array:
    z1 = _shifted(l2_normalize(_float(feats1)), center, shift)
    z2 = _shifted(l2_normalize(_float(feats2)), center, shift)
    return jnp.mean(jnp.sum(z1 * z2, axis=-1))


def positive_cosine(
    feats1: jax.Array, feats2: jax.Array, center: jax.Array | None, loss: str
) -> jax.Array:
    """Mean cosine between the two views of each image, in the space the loss sees (z)."""
    _check_views(feats1, feats2)
    return _positive_cosine(feats1, feats2, center, loss_shift(loss, center))


# ------------------------------------------------------------------------------------------------
# Parameter space.


def backbone_features(model: nn.Module, variables: PyTree, images: jax.Array) -> jax.Array:
    """Backbone outputs ``[N, D]`` (float32) with BatchNorm in inference mode, as in training."""
    return model.apply(variables, images, train=False).astype(jnp.float32)


def parameter_gradients(
    model: nn.Module,
    variables: PyTree,
    views1: jax.Array,
    views2: jax.Array,
    center: jax.Array | None = None,
    *,
    loss: str,
    temperature: float = 0.25,
    frozen: Sequence[str] = (),
) -> ParameterGradients:
    """Gradients of ``L_align`` and ``L_unif`` w.r.t. the trainable parameters.

    One forward pass of both views (BatchNorm in inference mode, as in training), then the two
    feature gradients are pulled back with one shared VJP. Frozen parameters are not
    differentiated (no backward pass through frozen stages) and get zero gradients. The sum of
    the two gradients is the gradient the training step of the same loss uses.

    Args:
      model: Flax backbone.
      variables: ``{'params': ..., 'batch_stats': ...}``.
      views1: ``[B, S, S, 3]`` preprocessed first views.
      views2: ``[B, S, S, 3]`` second views of the same images.
      center: ``[D]`` center (needed for 'msc').
      loss: 'contrastive' or 'msc'.
      temperature: ``tau``.
      frozen: regexes of frozen parameters (as in :func:`msad_jax.optimizer.make_optimizer`).

    Returns:
      The :class:`ParameterGradients`.
    """
    shift = loss_shift(loss, center)
    if views1.shape != views2.shape:
        raise ValueError(f"views differ in shape: {views1.shape} vs {views2.shape}")
    return _parameter_gradients(
        model,
        variables,
        views1,
        views2,
        center,
        shift,
        temperature=temperature,
        frozen=tuple(frozen),
    )


@functools.partial(jax.jit, static_argnames=("model", "temperature", "frozen"))
def _parameter_gradients(
    model: nn.Module,
    variables: PyTree,
    views1: jax.Array,
    views2: jax.Array,
    center: jax.Array | None,
    shift: jax.Array | float,
    *,
    temperature: float,
    frozen: tuple[str, ...],
) -> ParameterGradients:
    b = views1.shape[0]
    trainable, fixed = partition(variables["params"], frozen)

    def features_of(trainable: PyTree) -> jax.Array:
        return backbone_features(
            model,
            {**variables, "params": combine(trainable, fixed)},
            jnp.concatenate([views1, views2]),
        )

    feats, pullback = jax.vjp(features_of, trainable)
    grad_align_f, grad_uniform_f = _feature_gradients(
        feats[:b], feats[b:], center, shift, temperature=temperature
    )
    (grad_align,) = pullback(grad_align_f)
    (grad_uniform,) = pullback(grad_uniform_f)
    split = _loss_split(feats[:b], feats[b:], center, shift, temperature=temperature)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, fixed)
    return ParameterGradients(
        align=combine(grad_align, zeros),
        uniform=combine(grad_uniform, zeros),
        features=feats,
        split=split,
    )


def update_direction(
    grads: PyTree,
    params: PyTree,
    *,
    learning_rate: float,
    weight_decay: float,
    frozen: Sequence[str] = (),
) -> PyTree:
    """One SGD step's parameter change ``-lr * (g + wd * p)``; zero for frozen parameters.

    The update of :func:`msad_jax.optimizer.make_optimizer` itself (SPEC §5), so
    ``params + update_direction(...)`` is the next step's parameters.
    """
    tx = make_optimizer(
        params, learning_rate=learning_rate, weight_decay=weight_decay, frozen=tuple(frozen)
    )
    return tx.update(grads, tx.init(params), params)[0]


@functools.partial(jax.jit, static_argnames=("model",))
def radial_drift(
    model: nn.Module,
    variables: PyTree,
    images: jax.Array,
    center: jax.Array,
    direction: PyTree,
) -> tuple[jax.Array, jax.Array]:
    """Compactness of ``images`` and its directional derivative along ``direction`` (jax.jvp).

    With ``direction`` from :func:`update_direction` the derivative is the first-order change of
    compactness caused by one optimiser step (negative = the class spreads away from its center).

    Args:
      model: Flax backbone.
      variables: ``{'params': ..., 'batch_stats': ...}``.
      images: ``[N, S, S, 3]`` preprocessed (evaluation transform) images.
      center: ``[D]`` fixed center (its direction is used).
      direction: pytree like ``variables['params']``.

    Returns:
      ``(compactness, d compactness)`` scalars.
    """

    def compactness_of(params: PyTree) -> jax.Array:
        feats = backbone_features(model, {**variables, "params": params}, images)
        return compactness(feats, center)

    return jax.jvp(compactness_of, (variables["params"],), (direction,))


if __name__ == "__main__":
    from msad_jax.analysis.study_cli import run_cli

    run_cli()
