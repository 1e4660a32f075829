"""The conditioning argument of MSC as functions to differentiate (SPEC §1, §10).

Pretrained features of one class sit in a narrow cone; NT-Xent on phi is then dominated by its
uniformity term, while MSC's ``theta = normalize(phi - c)`` balances alignment and uniformity.
The functions measure it with ``jax.grad``/``jax.jvp``: gradient norms of the two terms, and
the radial drift, the first-order change of compactness caused by one SGD step of the optimizer.
Features may have any norm (normalised inside, as the training step does).
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

from msad_jax.losses import LOSSES, align_uniform_terms, l2_normalize
from msad_jax.models import cpu_lowering
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
      Scalar in [-1, 1]; 1 = every feature on the center's ray.
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

    Args:
      u: ``[N, D]`` vectors, used as given (pass phi or theta), ``N >= 2``.
      t: the scale (2 in the paper).
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


def loss_shift(loss: str, center: jax.Array | None = None) -> float:
    """The loss as a number: ``z = normalize(phi - shift * c)``, 0 = contrastive, 1 = msc.

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

    Args:
      feats1: ``[B, D]`` backbone outputs (or phi) of view 1.
      feats2: ``[B, D]`` of view 2.
      center: ``[D]`` center (needed for 'msc').
      loss: 'contrastive' or 'msc'.
      temperature: ``tau``.
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

    Args:
      model: Flax backbone.
      variables: ``{'params': ..., 'batch_stats': ...}``.
      views1: ``[B, S, S, 3]`` preprocessed first views.
      views2: ``[B, S, S, 3]`` second views of the same images.
      center: ``[D]`` center (needed for 'msc').
      loss: 'contrastive' or 'msc'.
      temperature: ``tau``.
      frozen: regexes of frozen parameters (as in :func:`msad_jax.optimizer.make_optimizer`).
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
    """One SGD step's parameter change ``-lr * (g + wd * p)``; zero for frozen parameters."""
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

    # Forward mode through the backbone: XLA's own convolutions, as the CPU lowering's custom
    # gradients are reverse-mode only.
    with cpu_lowering.xla_lowering():
        return jax.jvp(compactness_of, (variables["params"],), (direction,))


if __name__ == "__main__":
    from msad_jax.analysis.study_cli import run_cli

    run_cli()
