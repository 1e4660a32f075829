import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import jax_utils
from multidevice import run_on_devices

from msad_jax import losses
from msad_jax.optimizer import make_optimizer, trainable_mask
from msad_jax.train_step import (
    create_train_state,
    example_keys,
    make_train_step,
    pmap_train_step,
    replicate_state,
)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
FROZEN = ("^conv1/", "^bn1/", "^layer1/")
IMAGE = 16


class ConvBN(nn.Module):
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train):
        x = nn.Conv(self.features, (3, 3), strides=2, padding=1, use_bias=False,
                    dtype=self.dtype, param_dtype=jnp.float32, name="conv")(x)  # fmt: skip
        x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype,
                         param_dtype=jnp.float32, name="bn")(x)  # fmt: skip
        return nn.relu(x)


class TinyNet(nn.Module):
    """conv1/bn1 stem + two Conv-BN stages + global average pool, like a miniature ResNet."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train=False):
        x = x.astype(self.dtype)
        x = nn.Conv(8, (3, 3), padding=1, use_bias=False, dtype=self.dtype,
                    param_dtype=jnp.float32, name="conv1")(x)  # fmt: skip
        x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype,
                         param_dtype=jnp.float32, name="bn1")(x)  # fmt: skip
        x = nn.relu(x)
        x = ConvBN(8, self.dtype, name="layer1")(x, train)
        x = ConvBN(16, self.dtype, name="layer2")(x, train)
        return jnp.mean(x, axis=(1, 2))


def tiny_variables(seed=0):
    """Random params and non-trivial BatchNorm statistics (so inference-mode BN matters).

    Built from the abstract shapes (no model.init compile, which is slow on a busy CPU).
    """
    shapes = jax.eval_shape(TinyNet().init, jax.random.PRNGKey(0), jnp.zeros((1, IMAGE, IMAGE, 3)))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = rng.normal(0, np.sqrt(2.0 / fan_in), leaf.shape)
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 2.0, leaf.shape)
        else:  # bias, mean
            value = rng.normal(0, 0.2, leaf.shape)
        return value.astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, dict(shapes))


def make_views(seed, n):
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 1, size=(n, IMAGE, IMAGE, 3)).astype(np.float32)
    v1 = base + 0.1 * rng.normal(size=base.shape).astype(np.float32)
    v2 = base + 0.1 * rng.normal(size=base.shape).astype(np.float32)
    return v1, v2


@functools.partial(jax.jit, static_argnums=0)
def features(model, variables, x):
    return model.apply(variables, x, train=False).astype(jnp.float32)


@jax.jit
def tiny_phi(variables, x):
    return losses.l2_normalize(features(TinyNet(), variables, x))


def tiny_center(variables, normalize=False):
    v1, _ = make_views(123, 32)
    phi = np.asarray(tiny_phi(variables, v1), np.float64)
    c = phi.mean(axis=0)
    if normalize:
        c = c / np.linalg.norm(c)
    return c.astype(np.float32)


def plain_loss(params, batch_stats, v1, v2, mask, center, *, loss="msc", angular=False):
    """The objective written directly with the public losses, on the whole batch."""
    model = TinyNet()
    variables = {"params": params, "batch_stats": batch_stats}
    phi1 = losses.l2_normalize(features(model, variables, v1))
    phi2 = losses.l2_normalize(features(model, variables, v2))
    if loss == "msc":
        value = losses.mean_shifted_contrastive_loss(phi1, phi2, center, 0.25, mask=mask)
    else:
        value = losses.contrastive_loss(phi1, phi2, 0.25, mask=mask)
    if angular:
        value = value + losses.angular_center_loss(phi1, phi2, center, mask=mask)
    return value


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def toy_augment(keys, images):
    """One key per example, like msad_jax.data.augment.make_augment_fn."""
    x = images.astype(jnp.float32) / 255.0
    return x + 0.05 * jax.vmap(lambda k: jax.random.normal(k, x.shape[1:]))(keys)


LR, WD, B = 1e-5, 5e-5, 6


@functools.cache
def jit_step(loss="msc", angular=False, frozen=(), dtype=jnp.float32, augment=False):
    """(tx, jitted single-device step), built once per configuration to share compilations."""
    params = tiny_variables(0)["params"]  # structure only
    tx = make_optimizer(params, learning_rate=LR, weight_decay=WD, frozen=frozen)
    step = make_train_step(
        TinyNet(dtype=dtype), tx, loss=loss, angular=angular, frozen=frozen,
        augment_fn=toy_augment if augment else None, axis_name=None, with_grads=True,
    )  # fmt: skip
    return tx, jax.jit(step)


@pytest.mark.parametrize(
    "loss,angular,frozen", [("msc", True, FROZEN), ("msc", False, ()), ("contrastive", False, ())]
)
def test_step_equals_plain_loss_gradient_and_update(loss, angular, frozen):
    variables = tiny_variables(1)
    center = tiny_center(variables, normalize=angular)
    v1, v2 = make_views(0, B)
    mask = np.array([1, 1, 0, 1, 1, 1], bool)
    tx, step = jit_step(loss, angular, frozen)
    state = create_train_state(variables, tx, jax.random.PRNGKey(0))
    new_state, metrics = step(state, {"view1": v1, "view2": v2, "mask": mask}, center)

    plain = jax.jit(jax.value_and_grad(plain_loss), static_argnames=("loss", "angular"))
    want_loss, want_grads = plain(
        variables["params"], variables["batch_stats"], v1, v2, mask, center,
        loss=loss, angular=angular,
    )  # fmt: skip
    assert float(metrics["loss"]) == pytest.approx(float(want_loss), abs=2e-6)
    assert float(metrics["align"] + metrics["uniform"] + metrics["angular"]) == pytest.approx(
        float(metrics["loss"]), abs=2e-6
    )
    assert (float(metrics["angular"]) > 0) is angular
    assert int(metrics["count"]) == 5
    trainable = trainable_mask(variables["params"], frozen)
    lr32, wd32 = np.float32(LR), np.float32(WD)
    for m, p, g_step, g_plain, new in zip(
        jax.tree.leaves(trainable),
        jax.tree.leaves(variables["params"]),
        jax.tree.leaves(metrics["grads"]),
        jax.tree.leaves(want_grads),
        jax.tree.leaves(new_state.params),
        strict=True,
    ):
        p, new = np.asarray(p), np.asarray(new)
        if not m:
            assert np.all(np.asarray(g_step) == 0)
            assert new.tobytes() == p.tobytes()
            continue
        # the step's gradient is the independent jax.grad of the plain loss (to float rounding)...
        assert rel_err(g_step, g_plain) < 1e-5
        # ...and the update is exactly p - lr * (g + wd * p) with that gradient
        np.testing.assert_array_equal(new, p - lr32 * (np.asarray(g_step) + wd32 * p))
        # with the independent gradient: the same up to one ulp of p plus the float32 noise of
        # the gradient itself (elementwise up to ~5e-5 relative for the ill-conditioned standard
        # loss on nearly collinear features; the norm-wise error is < 1e-5, checked above)
        expected = p - lr32 * (np.asarray(g_plain) + wd32 * p)
        slack = np.spacing(np.abs(p)) + 2e-4 * np.abs(lr32 * np.asarray(g_plain))
        assert np.all(np.abs(new - expected) <= slack)
    assert int(new_state.step) == 1


def test_padded_rows_do_not_change_the_step():
    variables = tiny_variables(2)
    center = tiny_center(variables)
    tx, step = jit_step()
    state = create_train_state(variables, tx, jax.random.PRNGKey(0))
    v1, v2 = make_views(5, 4)
    short_state, short = step(state, {"view1": v1, "view2": v2, "mask": np.ones(4, bool)}, center)
    g1, g2 = make_views(6, 2)  # padding images: arbitrary content
    p1, p2 = np.concatenate([v1[:1], g1, v1[1:]]), np.concatenate([v2[:1], g2, v2[1:]])
    mask = np.array([1, 0, 0, 1, 1, 1], bool)
    padded_state, padded = step(state, {"view1": p1, "view2": p2, "mask": mask}, center)
    assert float(padded["loss"]) == pytest.approx(float(short["loss"]), abs=1e-6)
    for a, b in zip(jax.tree.leaves(padded["grads"]), jax.tree.leaves(short["grads"]), strict=True):
        assert rel_err(a, b) < 1e-5
    for a, b in zip(
        jax.tree.leaves(padded_state.params), jax.tree.leaves(short_state.params), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def test_pmap_step_equals_jit_step_and_keeps_frozen_and_batch_stats_bitwise():
    variables = tiny_variables(3)
    center = tiny_center(variables, normalize=True)
    tx, single = jit_step("msc", True, FROZEN)
    pmapped = pmap_train_step(
        make_train_step(TinyNet(), tx, angular=True, frozen=FROZEN, with_grads=True)
    )
    state = create_train_state(variables, tx, jax.random.PRNGKey(0))
    s_state, p_state = state, replicate_state(state)
    for i in range(3):
        v1, v2 = make_views(10 + i, B)
        mask = np.ones(B, bool)
        mask[4] = i != 2
        s_state, s_met = single(s_state, {"view1": v1, "view2": v2, "mask": mask}, center)
        batch = {"view1": v1[None], "view2": v2[None], "mask": mask[None]}
        p_state, p_met = pmapped(p_state, batch, center)
        jax.block_until_ready(p_met)
        assert float(p_met["loss"][0]) == pytest.approx(float(s_met["loss"]), abs=1e-6)
        p_grads, s_grads = jax.tree.leaves(p_met["grads"]), jax.tree.leaves(s_met["grads"])
        for a, b in zip(p_grads, s_grads, strict=True):
            assert rel_err(np.asarray(a)[0], b) < 1e-6
    p_state = jax_utils.unreplicate(p_state)
    assert int(p_state.step) == 3
    trainable = trainable_mask(variables["params"], FROZEN)
    changed = []
    for m, before, after, single_after in zip(
        jax.tree.leaves(trainable),
        jax.tree.leaves(variables["params"]),
        jax.tree.leaves(p_state.params),
        jax.tree.leaves(s_state.params),
        strict=True,
    ):
        before, after = np.asarray(before), np.asarray(after)
        np.testing.assert_allclose(after, single_after, rtol=1e-6, atol=1e-9)
        if m:
            changed.append(not np.array_equal(before, after))
        else:
            assert before.tobytes() == after.tobytes()
    assert changed and all(changed)  # every trainable leaf moved
    for before, after in zip(
        jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(p_state.batch_stats), strict=True
    ):
        assert np.asarray(before).tobytes() == np.asarray(after).tobytes()


def test_on_device_augmentation_uses_documented_keys():
    variables = tiny_variables(5)
    center = tiny_center(variables)
    tx, aug_step = jit_step(augment=True)
    _, view_step = jit_step()
    state = create_train_state(variables, tx, jax.random.PRNGKey(7))
    state = state.replace(step=jnp.asarray(3, jnp.int32))
    images = np.random.default_rng(0).integers(0, 256, (B, IMAGE, IMAGE, 3), dtype=np.uint8)
    mask = np.ones(B, bool)
    _, aug = aug_step(state, {"image": images, "mask": mask}, center)
    rows = jnp.arange(B)
    v1, v2 = (toy_augment(example_keys(state.rng, state.step, v, rows), images) for v in (0, 1))
    _, ref = view_step(state, {"view1": v1, "view2": v2, "mask": mask}, center)
    assert float(aug["loss"]) == pytest.approx(float(ref["loss"]), abs=1e-6)
    # the two views differ, and the next step draws new ones
    assert not np.array_equal(np.asarray(v1), np.asarray(v2))
    _, later = aug_step(state.replace(step=state.step + 1), {"image": images, "mask": mask}, center)
    assert float(later["loss"]) != float(aug["loss"])


def test_bad_arguments_raise_clear_errors():
    variables = tiny_variables(0)
    tx = make_optimizer(variables["params"])
    with pytest.raises(ValueError, match="unknown loss"):
        make_train_step(TinyNet(), tx, loss="simclr")
    with pytest.raises(ValueError, match="temperature"):
        make_train_step(TinyNet(), tx, temperature=0.0)
    with pytest.raises(ValueError, match="'params'"):
        create_train_state({"batch_stats": {}}, tx, jax.random.PRNGKey(0))
    state = create_train_state(variables, tx, jax.random.PRNGKey(0))
    step = make_train_step(TinyNet(), tx, axis_name=None)
    images = np.zeros((2, IMAGE, IMAGE, 3), np.uint8)
    with pytest.raises(ValueError, match="view1"):
        step(state, {"image": images, "mask": np.ones(2, bool)}, np.zeros(16, np.float32))
    with pytest.raises(ValueError, match="center is required"):
        step(state, {"view1": images, "view2": images, "mask": np.ones(2, bool)}, None)
    with pytest.raises(ValueError, match="matches no parameter"):
        make_train_step(TinyNet(), tx, frozen=("^layer9/",), axis_name=None)(
            state, {"view1": images, "view2": images, "mask": np.ones(2, bool)}, np.zeros(16)
        )


def test_bf16_compute_stays_close_to_fp32():
    variables = tiny_variables(6)
    center = tiny_center(variables)
    v1, v2 = make_views(2, B)
    f32 = features(TinyNet(), variables, v1)
    f16 = features(TinyNet(dtype=jnp.bfloat16), variables, v1)
    assert f16.dtype == jnp.float32  # cast back before normalising
    phi32, phi16 = np.asarray(losses.l2_normalize(f32)), np.asarray(losses.l2_normalize(f16))
    feat_dev = float(np.max(np.linalg.norm(phi32 - phi16, axis=-1)))
    spread = float(np.mean(np.linalg.norm(phi32 - center, axis=-1)))
    results = {}
    for name, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
        tx, step = jit_step(dtype=dtype)
        state = create_train_state(variables, tx, jax.random.PRNGKey(0))
        new_state, metrics = step(
            state, {"view1": v1, "view2": v2, "mask": np.ones(B, bool)}, center
        )
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new_state.params))
        assert metrics["loss"].dtype == jnp.float32
        results[name] = metrics
    loss_dev = abs(float(results["fp32"]["loss"]) - float(results["bf16"]["loss"]))
    grad_dev = rel_err(
        np.concatenate([np.ravel(g) for g in jax.tree.leaves(results["bf16"]["grads"])]),
        np.concatenate([np.ravel(g) for g in jax.tree.leaves(results["fp32"]["grads"])]),
    )
    print(
        f"\nbf16 vs fp32 (TinyNet, {B} images {IMAGE}px): max ||phi diff|| {feat_dev:.2e}, "
        f"mean ||phi - c|| {spread:.2e}, MSC loss {float(results['fp32']['loss']):.4f} "
        f"|diff| {loss_dev:.2e}, grad rel err {grad_dev:.2e}"
    )
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 2e-3): the unit features move by a
    # few 1e-3. MSC divides phi - c by its norm, which amplifies that by 1 / ||phi - c||.
    assert 0 < feat_dev < 1e-2
    assert loss_dev < 10 * feat_dev / spread
    assert grad_dev < 0.2


MULTI_DEVICE_SOURCE = """
import json, sys
sys.path.insert(0, {tests_dir!r})
import jax, jax.numpy as jnp, numpy as np
from flax import jax_utils
from test_train_step import (FROZEN, TinyNet, make_views, rel_err, tiny_center, tiny_variables,
                             toy_augment)
from msad_jax.optimizer import make_optimizer
from msad_jax.train_step import (create_train_state, make_train_step, pmap_train_step,
                                 replicate_state, example_keys)

n_dev = jax.local_device_count()
b = 2
variables = tiny_variables(7)
center = tiny_center(variables, normalize=True)
tx = make_optimizer(variables["params"], learning_rate=0.5, weight_decay=0.01, frozen=FROZEN)
kw = dict(loss="msc", angular=True, frozen=FROZEN, with_grads=True)
single = jax.jit(make_train_step(TinyNet(), tx, axis_name=None, **kw))
multi = pmap_train_step(make_train_step(TinyNet(), tx, **kw))
state = create_train_state(variables, tx, jax.random.PRNGKey(0))
s_state, m_state = state, replicate_state(state)
masks = [np.ones(n_dev * b, bool), np.ones(n_dev * b, bool), np.ones(n_dev * b, bool)]
masks[2][[1, 4, 5, 11]] = False  # padding spread over devices, one device fully padded
out = []
for i, mask in enumerate(masks):
    v1, v2 = make_views(100 + i, n_dev * b)
    s_state, s_met = single(s_state, dict(view1=v1, view2=v2, mask=mask), center)
    jax.block_until_ready(s_met)
    sharded = dict(view1=v1.reshape(n_dev, b, *v1.shape[1:]),
                   view2=v2.reshape(n_dev, b, *v2.shape[1:]), mask=mask.reshape(n_dev, b))
    m_state, m_met = multi(m_state, sharded, center)
    jax.block_until_ready(m_met)
    m_params = jax_utils.unreplicate(m_state.params)
    replicas_agree = all(
        float(np.max(np.abs(np.asarray(x) - np.asarray(x)[0]))) == 0.0
        for x in jax.tree.leaves(m_state.params))
    out.append(dict(
        n_dev=n_dev,
        loss_single=float(s_met["loss"]),
        loss_multi=[float(x) for x in m_met["loss"]],
        count_multi=float(m_met["count"][0]),
        grad_rel=max(rel_err(np.asarray(g)[0], s) for g, s in
                     zip(jax.tree.leaves(m_met["grads"]), jax.tree.leaves(s_met["grads"]))),
        grad_norm=float(np.sqrt(sum(np.sum(np.square(s)) for s in
                                    jax.tree.leaves(s_met["grads"])))),
        param_rel=max(rel_err(m, s) for m, s in
                      zip(jax.tree.leaves(m_params), jax.tree.leaves(s_state.params))),
        update_rel=max(rel_err(np.asarray(m) - p, np.asarray(s) - p) for m, s, p in
                       zip(jax.tree.leaves(m_params), jax.tree.leaves(s_state.params),
                           jax.tree.leaves(variables["params"]))
                       if not np.array_equal(np.asarray(s), p)),
        replicas_agree=replicas_agree,
    ))

# on-device augmentation: one key per (view, global row), so 8 devices draw the same views as
# one device given the whole global batch
aug_kw = dict(kw, augment_fn=toy_augment)
aug_multi = pmap_train_step(make_train_step(TinyNet(), tx, **aug_kw))
images = np.random.default_rng(3).integers(0, 256, (n_dev * b, 16, 16, 3), dtype=np.uint8)
mask = np.ones(n_dev * b, bool)
state = create_train_state(variables, tx, jax.random.PRNGKey(5))
_, a_met = aug_multi(replicate_state(state),
                     dict(image=images.reshape(n_dev, b, 16, 16, 3), mask=mask.reshape(n_dev, b)),
                     center)
jax.block_until_ready(a_met)
aug_single = jax.jit(make_train_step(TinyNet(), tx, axis_name=None, **aug_kw))
_, r_met = aug_single(state, dict(image=images, mask=mask), center)
aug = dict(loss_multi=float(a_met["loss"][0]), loss_single=float(r_met["loss"]),
           grad_rel=max(rel_err(np.asarray(g)[0], s) for g, s in
                        zip(jax.tree.leaves(a_met["grads"]), jax.tree.leaves(r_met["grads"]))))
print(json.dumps(dict(steps=out, augment=aug)))
"""


def test_eight_devices_equal_one_device_over_three_steps():
    report = run_on_devices(MULTI_DEVICE_SOURCE.format(tests_dir=TESTS_DIR), devices=8)
    results = report["steps"]
    assert len(results) == 3
    for i, r in enumerate(results):
        assert r["n_dev"] == 8
        assert all(loss == pytest.approx(r["loss_single"], rel=1e-5) for loss in r["loss_multi"]), (
            i,
            r,
        )
        assert r["count_multi"] == (16 if i < 2 else 12)
        assert r["grad_norm"] > 1e-3  # a real gradient, not a vacuous comparison
        assert r["grad_rel"] < 1e-5, (i, r)
        assert r["param_rel"] < 1e-5, (i, r)
        # the accumulated change of the parameters (not only their values) agrees as well
        assert r["update_rel"] < 1e-5, (i, r)
        assert r["replicas_agree"], (i, r)
    aug = report["augment"]
    assert aug["loss_multi"] == pytest.approx(aug["loss_single"], rel=1e-5), aug
    assert aug["grad_rel"] < 1e-5, aug


def test_frozen_stages_get_no_backward_pass():
    # TinyNet has 3 convolutions (conv1, layer1, layer2). Training everything needs 3 forward,
    # 3 kernel-gradient and 2 input-gradient convolutions; with conv1/bn1/layer1 frozen only
    # layer2's kernel gradient remains, and no gradient flows into the frozen stages at all.
    variables = tiny_variables(0)
    v1, v2 = make_views(0, B)
    batch = {"view1": v1, "view2": v2, "mask": np.ones(B, bool)}
    center = np.zeros(16, np.float32)
    counts = {}
    for frozen, angular in (((), False), (FROZEN, True)):
        tx, step = jit_step("msc", angular, frozen)
        state = create_train_state(variables, tx, jax.random.PRNGKey(0))
        counts[frozen] = step.lower(state, batch, center).as_text().count("stablehlo.convolution")
    assert counts[()] == 8
    assert counts[FROZEN] == 4
