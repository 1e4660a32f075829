import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from msad_jax.optimizer import make_optimizer, param_paths, trainable_mask

RESNET152_FROZEN = ("^conv1/", "^bn1/", "^layer1/", "^layer2/")


def resnet_like_params(seed=0):
    rng = np.random.default_rng(seed)

    def arr(*shape):
        return jnp.asarray(rng.normal(size=shape).astype(np.float32))

    def block(c):
        return {
            "conv1": {"kernel": arr(3, 3, c, c)},
            "bn1": {"scale": arr(c), "bias": arr(c)},
        }

    return {
        "conv1": {"kernel": arr(7, 7, 3, 4)},
        "bn1": {"scale": arr(4), "bias": arr(4)},
        "layer1": {"0": block(4)},
        "layer2": {"0": block(4)},
        "layer3": {"0": block(4), "1": block(4)},
        "layer4": {"0": block(4)},
    }


def test_param_paths_join_names_with_slashes():
    paths = param_paths(resnet_like_params())
    assert paths["layer3"]["1"]["conv1"]["kernel"] == "layer3/1/conv1/kernel"
    assert paths["bn1"]["scale"] == "bn1/scale"


def test_trainable_mask_resnet152_default():
    mask = trainable_mask(resnet_like_params(), RESNET152_FROZEN)
    flat = dict(zip(jax.tree.leaves(param_paths(mask)), jax.tree.leaves(mask), strict=True))
    for path, trainable in flat.items():
        frozen = path.split("/")[0] in ("conv1", "bn1", "layer1", "layer2")
        assert trainable is (not frozen), path
    # nothing frozen by default
    assert all(jax.tree.leaves(trainable_mask(resnet_like_params())))


def test_frozen_pattern_is_anchored_by_the_caller():
    # '^conv1/' must not freeze layer*/0/conv1; an unanchored 'conv1' would
    mask = trainable_mask(resnet_like_params(), ("^conv1/",))
    assert mask["conv1"]["kernel"] is False
    assert mask["layer3"]["0"]["conv1"]["kernel"] is True
    loose = trainable_mask(resnet_like_params(), ("conv1",))
    assert loose["layer3"]["0"]["conv1"]["kernel"] is False


def test_typo_in_frozen_pattern_lists_valid_names():
    with pytest.raises(ValueError, match=r"matches no parameter.*layer1"):
        trainable_mask(resnet_like_params(), ("^layer_1/",))
    with pytest.raises(ValueError, match="not a valid regex"):
        trainable_mask(resnet_like_params(), ("^layer1/(",))
    with pytest.raises(ValueError, match="sequence of patterns"):
        trainable_mask(resnet_like_params(), "^layer1/")


def test_bad_hyperparameters_raise():
    with pytest.raises(ValueError, match="learning_rate"):
        make_optimizer(resnet_like_params(), learning_rate=0.0)
    with pytest.raises(ValueError, match="weight_decay"):
        make_optimizer(resnet_like_params(), weight_decay=-1.0)


@pytest.mark.parametrize("frozen", [(), RESNET152_FROZEN])
def test_update_is_coupled_sgd_on_trainable_and_zero_on_frozen(frozen):
    params = resnet_like_params(1)
    grads = jax.tree.map(lambda p: jnp.asarray(np.cos(np.asarray(p) * 3.0) * 0.1), params)
    lr, wd = 1e-2, 5e-2  # large so the decay term is visible in float32
    tx = make_optimizer(params, learning_rate=lr, weight_decay=wd, frozen=frozen)
    state = tx.init(params)
    mask = trainable_mask(params, frozen)
    for _ in range(3):  # constant rate, no momentum: every step has the same form
        updates, state = tx.update(grads, state, params)
        new = optax.apply_updates(params, updates)
        for trainable, p, g, u, n in zip(
            jax.tree.leaves(mask),
            jax.tree.leaves(params),
            jax.tree.leaves(grads),
            jax.tree.leaves(updates),
            jax.tree.leaves(new),
            strict=True,
        ):
            p, g, n = np.asarray(p), np.asarray(g), np.asarray(n)
            if trainable:
                lr32, wd32 = np.float32(lr), np.float32(wd)
                expected = p - lr32 * (g + wd32 * p)
                np.testing.assert_array_equal(n, expected)
            else:
                assert np.all(np.asarray(u) == 0)
                np.testing.assert_array_equal(n, p)
        params = new


def test_weight_decay_reaches_only_trainable_params():
    params = resnet_like_params(2)
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = make_optimizer(params, learning_rate=0.5, weight_decay=0.1, frozen=RESNET152_FROZEN)
    updates, _ = tx.update(zeros, tx.init(params), params)
    mask = trainable_mask(params, RESNET152_FROZEN)
    for trainable, p, u in zip(
        jax.tree.leaves(mask), jax.tree.leaves(params), jax.tree.leaves(updates), strict=True
    ):
        if trainable:
            np.testing.assert_allclose(np.asarray(u), -0.5 * 0.1 * np.asarray(p), rtol=1e-6)
        else:
            assert np.all(np.asarray(u) == 0)
