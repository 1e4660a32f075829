"""The MSC fine-tuning step, written per device over a named axis and run with ``jax.pmap``.

Each device scores its own anchors against the gathered global batch and divides by the global
anchor count, so the summed gradients equal the single-device ones (the tests check this). Frozen
parameters are split off before ``jax.grad``: no backward pass through them, copied bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import jax_utils
from jax import lax

from msad_jax.losses import LOSSES, l2_normalize, mean_shift, nt_xent_rows
from msad_jax.optimizer import combine, partition

PyTree = Any
Batch = dict[str, jax.Array]
AugmentFn = Callable[[jax.Array, jax.Array], jax.Array]  # (keys [b], uint8 [b,H,W,3]) -> views
StepFn = Callable[[Any, Batch, jax.Array | None], tuple[Any, dict[str, jax.Array]]]


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes (a pytree).

    Attributes:
      params: model parameters (the ``'params'`` collection), float32.
      batch_stats: BatchNorm running statistics; never updated (inference-mode BN).
      opt_state: optax state of the transformation passed to :func:`make_train_step`.
      step: int32 scalar, number of steps taken.
      rng: PRNG key from which augmentation keys are derived.
    """

    params: PyTree
    batch_stats: PyTree
    opt_state: optax.OptState
    step: jax.Array
    rng: jax.Array


def create_train_state(
    variables: dict[str, PyTree], tx: optax.GradientTransformation, rng: jax.Array
) -> TrainState:
    """Builds the initial state from model variables (single copy; replicate it for pmap).

    Args:
      variables: ``{'params': ..., 'batch_stats': ...}`` (``batch_stats`` optional).
      tx: the optimizer, e.g. from :func:`msad_jax.optimizer.make_optimizer`.
      rng: PRNG key for augmentations.

    Raises:
      ValueError: if ``variables`` has no ``'params'`` entry.
    """
    if "params" not in variables:
        raise ValueError(
            f"variables must contain 'params' (got keys {sorted(variables)}); pass the dict "
            "returned by model.init or the pretrained-weight loader"
        )
    params = variables["params"]
    return TrainState(
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=rng,
    )


def _apply_features(model: nn.Module, params: PyTree, batch_stats: PyTree, x: jax.Array):
    """Backbone forward with BatchNorm in inference mode; float32 features."""
    variables = {"params": params}
    if jax.tree_util.tree_leaves(batch_stats):
        variables["batch_stats"] = batch_stats
    return model.apply(variables, x, train=False).astype(jnp.float32)


def example_keys(rng: jax.Array, step: jax.Array, view: int, rows: jax.Array) -> jax.Array:
    """Augmentation keys ``[len(rows)]`` of one view of the given global-batch rows.

    A key depends only on (rng, step, view, row), so views do not depend on the device count.
    """
    base = jax.random.fold_in(jax.random.fold_in(rng, step), view)
    return jax.vmap(lambda row: jax.random.fold_in(base, row))(rows)


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    *,
    loss: str = "msc",
    angular: bool = False,
    temperature: float = 0.25,
    augment_fn: AugmentFn | None = None,
    frozen: Sequence[str] = (),
    axis_name: str | None = "batch",
    with_grads: bool = False,
) -> StepFn:
    """Builds the per-device training step ``(state, batch, center) -> (state, metrics)``.

    ``batch`` is this device's share: ``'mask'`` bool ``[b]`` (False = padding) and either
    ``'view1'``/``'view2'`` float ``[b, S, S, 3]`` or, with ``augment_fn``, ``'image'`` uint8.
    Metrics (global means): ``loss``, ``align``, ``uniform``, ``angular``, ``count`` and, with
    ``with_grads``, ``grads``.

    Args:
      model: Flax backbone, ``apply(variables, x, train=False) -> [n, D]``; its ``dtype`` sets the
        compute dtype (features are cast to float32 before the loss).
      tx: optax transformation (:func:`msad_jax.optimizer.make_optimizer` with the same ``frozen``).
      loss: ``'msc'`` (NT-Xent on theta) or ``'contrastive'`` (NT-Xent on phi).
      angular: add the angular center term (SPEC §4).
      temperature: ``tau``.
      augment_fn: ``(keys [b], images_uint8 [b, H, W, 3]) -> float32 [b, S, S, 3]`` with one PRNG
        key per example (e.g. :func:`msad_jax.data.augment.make_augment_fn`), or None.
      frozen: regex patterns of parameters that get no gradient and no update.
      axis_name: pmap axis name; None for a plain single-device step (no collectives).
      with_grads: also return the gradient tree in the metrics (for tests and diagnostics).

    Returns:
      The per-device step; wrap it with :func:`pmap_train_step` (or ``jax.jit`` when
      ``axis_name`` is None).

    Raises:
      ValueError: for an unknown ``loss`` or a non-positive temperature.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    frozen = tuple(frozen)

    def gather(x: jax.Array) -> jax.Array:
        return x if axis_name is None else lax.all_gather(x, axis_name, tiled=True)

    def reduce_sum(x: PyTree) -> PyTree:
        return x if axis_name is None else lax.psum(x, axis_name)

    def views(state: TrainState, batch: Batch) -> tuple[jax.Array, jax.Array]:
        if augment_fn is None:
            if "view1" not in batch or "view2" not in batch:
                raise ValueError(
                    f"batch has keys {sorted(batch)}; without augment_fn it needs 'view1' and "
                    "'view2' (or pass augment_fn and an 'image' batch)"
                )
            return batch["view1"], batch["view2"]
        if "image" not in batch:
            raise ValueError(f"batch has keys {sorted(batch)}; with augment_fn it needs 'image'")
        b = batch["image"].shape[0]
        device = 0 if axis_name is None else lax.axis_index(axis_name)
        rows = device * b + jnp.arange(b)
        images = batch["image"]
        return tuple(
            augment_fn(example_keys(state.rng, state.step, view, rows), images) for view in (0, 1)
        )

    def step(
        state: TrainState, batch: Batch, center: jax.Array | None
    ) -> tuple[TrainState, dict[str, Any]]:
        mask = jnp.asarray(batch["mask"], dtype=bool)
        x1, x2 = views(state, batch)
        b = mask.shape[0]
        if center is None and (loss == "msc" or angular):
            raise ValueError("center is required for loss='msc' or angular=True")
        if center is not None:
            center = jnp.asarray(center, jnp.float32)

        # Global layout: rows [0, N) are view 1 of all devices in device order, [N, 2N) view 2.
        all_mask = gather(mask)
        n_global = all_mask.shape[0]
        device = 0 if axis_name is None else lax.axis_index(axis_name)
        local_rows = device * b + jnp.arange(b)
        self_index = jnp.concatenate([local_rows, n_global + local_rows])
        positive_index = jnp.concatenate([n_global + local_rows, local_rows])
        anchor_mask = jnp.concatenate([mask, mask])
        candidate_mask = jnp.concatenate([all_mask, all_mask])
        n_valid = jnp.sum(all_mask.astype(jnp.float32))
        denom = jnp.maximum(2.0 * n_valid, 1.0)

        trainable, fixed = partition(state.params, frozen)

        def local_loss(trainable: PyTree) -> tuple[jax.Array, dict[str, jax.Array]]:
            params = combine(trainable, fixed)
            feats = _apply_features(model, params, state.batch_stats, jnp.concatenate([x1, x2]))
            phi = l2_normalize(feats)
            z = mean_shift(phi, center) if loss == "msc" else phi
            z1, z2 = z[:b], z[b:]
            candidates = jnp.concatenate([gather(z1), gather(z2)])
            align, uniform, per_anchor = nt_xent_rows(
                jnp.concatenate([z1, z2]),
                candidates,
                self_index,
                positive_index,
                candidate_mask,
                temperature=temperature,
            )
            zero = jnp.zeros((), jnp.float32)

            def share(values: jax.Array) -> jax.Array:
                # this device's share of the global mean over valid anchors
                return jnp.sum(jnp.where(anchor_mask, values, zero)) / denom

            terms = {
                "contrastive": share(per_anchor),
                "align": jax.lax.stop_gradient(share(align)),
                "uniform": jax.lax.stop_gradient(share(uniform)),
                "angular": zero,
            }
            if angular:
                sq = jnp.sum(jnp.square(phi - center), axis=-1)
                # mean over valid images of each view, summed over the two views
                terms["angular"] = jnp.sum(jnp.where(anchor_mask, sq, zero)) / jnp.maximum(
                    n_valid, 1.0
                )
            return terms["contrastive"] + terms["angular"], terms

        grads, terms = jax.grad(local_loss, has_aux=True)(trainable)
        # Each device holds its share of the gradient of the global loss: sum the shares.
        grads = reduce_sum(grads)
        terms = reduce_sum(terms)
        full_grads = combine(grads, jax.tree_util.tree_map(jnp.zeros_like, fixed))
        updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
        # Frozen parameters are copied through bit for bit (not p + 0, which turns -0.0 into 0.0).
        new_params = combine(fixed, optax.apply_updates(state.params, updates))
        contrastive = terms.pop("contrastive")
        metrics = {"loss": contrastive + terms["angular"], **terms, "count": n_valid}
        if with_grads:
            metrics["grads"] = full_grads
        new_state = state.replace(params=new_params, opt_state=opt_state, step=state.step + 1)
        return new_state, metrics

    return step


def replicate_state(tree: PyTree, *, axis_name: str = "batch") -> PyTree:
    """Copies a pytree (e.g. a :class:`TrainState`) to every local device for the pmapped step.

    The mesh axis is named like the pmap axis, so the step's outputs keep the inputs' sharding and
    the second call does not recompile.

    Args:
      tree: pytree of arrays.
      axis_name: the pmap axis name.

    Returns:
      The tree with a leading device axis.
    """
    return jax_utils.replicate(tree, axis_name=axis_name)


def pmap_train_step(step: StepFn, *, axis_name: str = "batch") -> StepFn:
    """Runs a per-device step over the local devices.

    Args:
      step: from :func:`make_train_step` with the same ``axis_name``.
      axis_name: the named axis the step's collectives use.

    Returns:
      ``pmapped(state, batch, center) -> (state, metrics)`` with a leading device axis everywhere.
    """
    return jax.pmap(step, axis_name=axis_name, in_axes=(0, 0, None), donate_argnums=(0,))
