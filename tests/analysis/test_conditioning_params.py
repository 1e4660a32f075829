"""Parameter-space quantities: gradients, update direction and radial drift against the library
training step and finite differences."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from msad_jax.analysis import conditioning as cond
from msad_jax.optimizer import make_optimizer
from msad_jax.train_step import create_train_state, make_train_step

FROZEN = ("^stem/",)


class SmallNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(6, (3, 3), use_bias=False, name="stem")(x)
        x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
        x = nn.relu(x)
        x = nn.Conv(10, (3, 3), strides=2, name="head")(x)
        return jnp.mean(x, axis=(1, 2))


def setup(seed=0, b=6):
    model = SmallNet()
    keys = jax.random.split(jax.random.key(seed), 4)
    views1 = jax.random.normal(keys[0], (b, 8, 8, 3))
    views2 = views1 + 0.3 * jax.random.normal(keys[1], (b, 8, 8, 3))
    variables = model.init(keys[2], views1)
    variables = {
        "params": variables["params"],
        "batch_stats": jax.tree_util.tree_map(
            lambda x: x + 0.1 * jnp.abs(jax.random.normal(keys[3], x.shape)),
            variables["batch_stats"],
        ),
    }
    feats = model.apply(variables, views1)
    center = jnp.mean(feats / jnp.linalg.norm(feats, axis=1, keepdims=True), axis=0)
    return model, variables, views1, views2, center


@pytest.mark.parametrize("loss", cond.LOSSES)
def test_parameter_gradients_and_update_match_the_training_step(loss):
    model, variables, views1, views2, center = setup()
    lr, wd = 0.05, 0.01
    grads = cond.parameter_gradients(
        model, variables, views1, views2, center, loss=loss, frozen=FROZEN
    )
    tx = make_optimizer(variables["params"], learning_rate=lr, weight_decay=wd, frozen=FROZEN)
    step = make_train_step(model, tx, loss=loss, frozen=FROZEN, axis_name=None, with_grads=True)
    state = create_train_state(variables, tx, jax.random.key(0))
    batch = {"view1": views1, "view2": views2, "mask": jnp.ones((6,), bool)}
    new_state, metrics = jax.jit(step)(state, batch, center)
    total = jax.tree_util.tree_map(jnp.add, grads.align, grads.uniform)
    for ours, theirs in zip(
        jax.tree_util.tree_leaves(total), jax.tree_util.tree_leaves(metrics["grads"]), strict=True
    ):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)
    assert float(grads.split.align) == pytest.approx(float(metrics["align"]), rel=1e-5)
    assert float(grads.split.uniform) == pytest.approx(float(metrics["uniform"]), rel=1e-5)
    assert float(optax.tree.norm(grads.align["stem"])) == 0.0  # frozen: not differentiated
    assert float(optax.tree.norm(grads.align["head"])) > 0.0
    direction = cond.update_direction(
        total, variables["params"], learning_rate=lr, weight_decay=wd, frozen=FROZEN
    )
    moved = jax.tree_util.tree_map(jnp.subtract, new_state.params, variables["params"])
    for ours, theirs in zip(
        jax.tree_util.tree_leaves(direction), jax.tree_util.tree_leaves(moved), strict=True
    ):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-7)


def test_radial_drift_is_the_directional_derivative_of_compactness():
    model, variables, views1, views2, center = setup(seed=1)
    grads = cond.parameter_gradients(model, variables, views1, views2, center, loss="contrastive")
    total = jax.tree_util.tree_map(jnp.add, grads.align, grads.uniform)
    direction = cond.update_direction(
        total, variables["params"], learning_rate=1.0, weight_decay=0.0
    )
    images = views1
    value, drift = cond.radial_drift(model, variables, images, center, direction)

    def compactness_at(eps):
        params = jax.tree_util.tree_map(lambda p, d: p + eps * d, variables["params"], direction)
        feats = model.apply({**variables, "params": params}, images)
        return float(cond.compactness(feats, center))

    assert float(value) == pytest.approx(compactness_at(0.0), abs=1e-6)
    eps = 1e-2
    finite = (compactness_at(eps) - compactness_at(-eps)) / (2 * eps)
    assert float(drift) == pytest.approx(finite, rel=2e-2, abs=1e-5)
    assert abs(float(drift)) > 1e-4  # the test would be vacuous for a zero derivative
