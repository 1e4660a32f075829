"""The CPU lowering (msad_jax.models.cpu_lowering) against XLA's own operations (the oracle).

Every convolution configuration of ResNet-18 and EfficientNet-Lite0 at 224x224 (recorded by
tracing the real models) is checked in values and in both gradients against
``lax.conv_general_dilated``; max-pooling against ``lax.reduce_window`` and JAX's gradient
(``select_and_scatter``), ties included; one whole training step against the step with the
lowering switched off.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msad_jax import cpu_flags
from msad_jax.models import build_backbone, cpu_lowering, init_variables
from msad_jax.optimizer import make_optimizer
from msad_jax.train_step import create_train_state, make_train_step

RTOL = 1e-4  # max |ours - XLA| / max |XLA|, float32 (summation order differs)
STEP_RTOL = 2e-4  # the same, for gradients and updates after a whole network
EPS32 = float(np.finfo(np.float32).eps)
MAX_CHANNELS = 16  # channel counts are capped; size, kernel, stride, padding are the models'


def _rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _record_convolutions(backbone: str, size: int = 224) -> set[tuple]:
    """(input shape, kernel shape, strides, padding, groups) of every convolution of a model."""
    seen: set[tuple] = set()
    original = cpu_lowering.conv_general_dilated

    def recorder(lhs, rhs, window_strides, padding, **kwargs):
        seen.add(
            (
                tuple(lhs.shape[1:]),
                tuple(rhs.shape),
                tuple(window_strides),
                tuple(tuple(p) for p in padding),
                kwargs.get("feature_group_count", 1),
            )
        )
        return original(lhs, rhs, window_strides, padding, **kwargs)

    model = build_backbone(backbone)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_lowering, "conv_general_dilated", recorder)
        images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
    return seen


def _configurations() -> list[tuple]:
    configs = set()
    for backbone in ("resnet18", "efficientnet_lite0"):
        for (h, w, cin), (kh, kw, _, cout), strides, padding, groups in sorted(
            _record_convolutions(backbone)
        ):
            depthwise = groups > 1
            c_in = min(cin, MAX_CHANNELS)
            c_out = c_in if depthwise else min(cout, MAX_CHANNELS)
            kernel = (kh, kw, 1 if depthwise else c_in, c_out)
            configs.add(((h, w, c_in), kernel, strides, padding, c_in if depthwise else 1))
    return sorted(configs)


CONFIGURATIONS = _configurations()


def _lax_conv(x, w, strides, padding, groups):
    return jax.lax.conv_general_dilated(
        x,
        w,
        strides,
        padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


def _ours(x, w, strides, padding, groups):
    return cpu_lowering.conv_general_dilated(
        x,
        w,
        strides,
        padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


def test_the_recorded_configurations_cover_every_kind():
    kinds = {
        (
            "depthwise" if groups > 1 else f"{kernel[0]}x{kernel[1]}",
            strides[0],
            padding[0][0] != padding[0][1],
        )
        for _, kernel, strides, padding, groups in CONFIGURATIONS
    }
    # 1x1 (stride 1 and 2), dense 3x3/7x7 (stride 1 and 2), depthwise 3x3 and 5x5 with
    # EfficientNet's asymmetric static "SAME" padding (stride 2) and symmetric padding.
    assert {("1x1", 1, False), ("1x1", 2, False), ("3x3", 1, False), ("3x3", 2, False)} <= kinds
    assert {("7x7", 2, False), ("3x3", 2, True), ("depthwise", 2, True)} <= kinds
    assert ("depthwise", 1, False) in kinds
    kernels = {kernel[0] for _, kernel, _, _, groups in CONFIGURATIONS if groups > 1}
    assert kernels == {3, 5}


@pytest.mark.parametrize("config", CONFIGURATIONS, ids=str)
def test_convolution_values_and_gradients_equal_xla(config):
    (h, w, c), kernel, strides, padding, groups = config
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, h, w, c)), jnp.float32)
    k = jnp.asarray(rng.standard_normal(kernel), jnp.float32)
    ref, ref_vjp = jax.vjp(lambda x, k: _lax_conv(x, k, strides, padding, groups), x, k)
    ours, ours_vjp = jax.vjp(lambda x, k: _ours(x, k, strides, padding, groups), x, k)
    assert ours.shape == ref.shape
    assert _rel_err(ours, ref) < RTOL
    g = jnp.asarray(rng.standard_normal(ref.shape), jnp.float32)
    for name, a, b in zip(("input", "kernel"), ours_vjp(g), ref_vjp(g), strict=True):
        assert _rel_err(a, b) < RTOL, name


def test_depthwise_and_pointwise_convolutions_take_the_cpu_lowering(monkeypatch):
    x = jnp.ones((1, 8, 8, 4))

    def primitives(kernel, groups):
        jaxpr = jax.make_jaxpr(lambda x: _ours(x, kernel, (2, 2), ((0, 1), (0, 1)), groups))(x)
        return {eqn.primitive.name for eqn in jaxpr.jaxpr.eqns}

    depthwise, pointwise = jnp.ones((3, 3, 1, 4)), jnp.ones((1, 1, 4, 6))
    assert "conv_general_dilated" not in primitives(depthwise, 4)
    assert "conv_general_dilated" in primitives(jnp.ones((3, 3, 4, 6)), 1)  # dense: XLA's
    monkeypatch.setenv(cpu_flags.ENV_VAR, "0")
    assert not cpu_lowering.active()
    assert "conv_general_dilated" in primitives(depthwise, 4)
    jaxpr = jax.make_jaxpr(lambda x: _ours(x, pointwise, (1, 1), ((0, 0), (0, 0)), 1))(x)
    assert "conv_general_dilated" in {eqn.primitive.name for eqn in jaxpr.jaxpr.eqns}


def test_exports_and_symbolic_shapes_keep_xla_own_convolutions():
    """Inside ``xla_lowering`` (what ``msad_jax.export`` uses) and for symbolic shapes the
    convolution stays XLA's own, so an exported program runs the same ops on every platform."""
    from jax import export

    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 9, 9, 4)), jnp.float32)
    depthwise = jnp.asarray(np.random.default_rng(5).standard_normal((3, 3, 1, 4)), jnp.float32)

    def conv(x):
        return _ours(x, depthwise, (2, 2), ((0, 1), (0, 1)), 4)

    def primitives(x):  # a new function each time: traces are cached per function
        return {eqn.primitive.name for eqn in jax.make_jaxpr(lambda x: conv(x))(x).jaxpr.eqns}

    assert cpu_lowering.active() and "conv_general_dilated" not in primitives(x)
    with cpu_lowering.xla_lowering():
        assert not cpu_lowering.active()
        assert "conv_general_dilated" in primitives(x)
    assert cpu_lowering.active()
    spec = jax.ShapeDtypeStruct(export.symbolic_shape("b, h, w, 4"), jnp.float32)
    exported = export.export(jax.jit(conv), platforms=("cpu", "cuda"))(spec)
    assert "stablehlo.convolution" in exported.mlir_module()
    np.testing.assert_allclose(
        exported.call(x), _lax_conv(x, depthwise, (2, 2), ((0, 1), (0, 1)), 4), rtol=1e-6
    )
    pooled = export.export(jax.jit(_ours_max_pool), platforms=("cpu", "cuda"))(spec)
    np.testing.assert_array_equal(pooled.call(x), _flax_max_pool(x))


def test_bfloat16_depthwise_and_pointwise_stay_close_to_float32():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 15, 15, 8)), jnp.float32)
    for kernel, groups, padding in (
        ((5, 5, 1, 8), 8, ((1, 2), (1, 2))),
        ((1, 1, 8, 4), 1, ((0, 0),) * 2),
    ):
        k = jnp.asarray(rng.standard_normal(kernel), jnp.float32)
        ref = _lax_conv(x, k, (2, 2), padding, groups)
        ours = _ours(x.astype(jnp.bfloat16), k.astype(jnp.bfloat16), (2, 2), padding, groups)
        assert ours.dtype == jnp.bfloat16
        assert _rel_err(ours, ref) < 0.02


def _flax_max_pool(x):
    import flax.linen as nn

    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _ours_max_pool(x):
    return cpu_lowering.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))


@pytest.mark.parametrize("size", [112, 9])
def test_max_pool_equals_xla_with_ties(size):
    rng = np.random.default_rng(2)
    # Small integers after a ReLU: many windows hold their maximum more than once.
    x = jnp.asarray(np.maximum(rng.integers(-2, 3, (2, size, size, 3)), 0), jnp.float32)
    ref, ref_vjp = jax.vjp(_flax_max_pool, x)
    ours, ours_vjp = jax.vjp(_ours_max_pool, x)
    np.testing.assert_array_equal(ours, ref)
    g = jnp.asarray(rng.standard_normal(ref.shape), jnp.float32)
    (ours_grad,), (ref_grad,) = ours_vjp(g), ref_vjp(g)
    # Each window's gradient lands on the same element; only overlapping windows' sums may round
    # differently.
    np.testing.assert_allclose(ours_grad, ref_grad, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ours_grad != 0, ref_grad != 0)


SIZE = 32


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
def test_one_training_step_equals_the_default_lowering(backbone, monkeypatch):
    """Loss, gradients and updated parameters of one MSC step, lowering on vs off.

    32x32 images (4 views) keep it cheap; the per-convolution tests above cover the 224x224
    shapes and paddings.
    """
    model = build_backbone(backbone)
    variables = init_variables(model, SIZE, 0)
    tx = make_optimizer(variables["params"], learning_rate=0.1, weight_decay=5e-5)
    rng = np.random.default_rng(3)
    batch = {
        "view1": rng.standard_normal((2, SIZE, SIZE, 3)).astype(np.float32),
        "view2": rng.standard_normal((2, SIZE, SIZE, 3)).astype(np.float32),
        "mask": np.ones(2, bool),
    }
    center = rng.standard_normal(model.feature_dim).astype(np.float32) * 0.03

    def one_step():
        state = create_train_state(variables, tx, jax.random.key(0))
        step = jax.jit(make_train_step(model, tx, axis_name=None, with_grads=True))
        return jax.device_get(step(state, batch, center))

    new_state, new_metrics = one_step()
    monkeypatch.setenv(cpu_flags.ENV_VAR, "off")
    old_state, old_metrics = one_step()
    np.testing.assert_allclose(new_metrics["loss"], old_metrics["loss"], rtol=1e-6)
    leaves = jax.tree_util.tree_leaves_with_path
    old_grads = dict(leaves(old_metrics["grads"]))
    old_params = dict(leaves(old_state.params))
    initial = dict(leaves(variables["params"]))
    for path, grad in leaves(new_metrics["grads"]):
        assert _rel_err(grad, old_grads[path]) < STEP_RTOL, jax.tree_util.keystr(path)
    for path, param in leaves(new_state.params):
        old, old_update = old_params[path], old_params[path] - initial[path]
        # The updates agree like the gradients; the parameters also carry their own rounding.
        bound = STEP_RTOL * np.max(np.abs(old_update)) + 2 * EPS32 * np.max(np.abs(old))
        assert np.max(np.abs(param - old)) <= bound, jax.tree_util.keystr(path)
