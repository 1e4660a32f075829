"""Feature-level conditioning quantities against NumPy oracles and exact identities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msad_jax import losses
from msad_jax.analysis import conditioning as cond
from msad_jax.analysis.synthetic_features import cone_features


def np_unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_nt_xent_terms(z1, z2, tau):
    """Independent NT-Xent split: every row an anchor, denominator over all other rows."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    n, b = len(z), len(z1)
    sims = z @ z.T / tau
    align, uniform = [], []
    for i in range(n):
        p = (i + b) % n
        others = np.delete(sims[i], i)
        align.append(-sims[i, p])
        top = others.max()
        uniform.append(top + np.log(np.sum(np.exp(others - top))))
    return np.mean(align), np.mean(uniform)


def random_views(seed, b=5, d=7, scale=2.0):
    rng = np.random.default_rng(seed)
    f1 = rng.normal(size=(b, d)) * scale
    f2 = f1 + 0.3 * rng.normal(size=(b, d))
    center = rng.normal(size=d) * 0.3
    return f1.astype(np.float32), f2.astype(np.float32), center.astype(np.float32)


def test_compactness_and_uniformity_match_numpy():
    rng = np.random.default_rng(0)
    phi = rng.normal(size=(9, 6)) + np.array([3.0, 0, 0, 0, 0, 0])
    center = rng.normal(size=6) + np.array([2.0, 0, 0, 0, 0, 0])
    expected = np.mean(np_unit(phi) @ (center / np.linalg.norm(center)))
    assert float(cond.compactness(jnp.asarray(phi, jnp.float32), center)) == pytest.approx(
        expected, abs=1e-6
    )
    u = np_unit(phi)
    pairs = [
        np.exp(-2.0 * np.sum((u[i] - u[j]) ** 2)) for i in range(9) for j in range(9) if i != j
    ]
    assert float(cond.uniformity(jnp.asarray(u, jnp.float32))) == pytest.approx(
        np.log(np.mean(pairs)), abs=1e-5
    )
    # The mean of the features as center: compactness = norm of the mean.
    assert float(cond.compactness(u, u.mean(0))) == pytest.approx(
        np.linalg.norm(u.mean(0)), abs=1e-6
    )
    with pytest.raises(ValueError, match="at least two"):
        cond.uniformity(jnp.ones((1, 3)))


@pytest.mark.parametrize("loss", cond.LOSSES)
def test_split_sums_to_the_loss_and_matches_numpy(loss):
    f1, f2, center = random_views(1)
    split = cond.loss_split(f1, f2, center, loss=loss, temperature=0.25)
    if loss == "contrastive":
        reference = losses.contrastive_loss(f1, f2, temperature=0.25)
        z1, z2 = np_unit(f1), np_unit(f2)
    else:
        phi1, phi2 = losses.l2_normalize(f1), losses.l2_normalize(f2)
        reference = losses.mean_shifted_contrastive_loss(phi1, phi2, center, temperature=0.25)
        z1, z2 = np_unit(np_unit(f1) - center), np_unit(np_unit(f2) - center)
    assert float(split.total) == pytest.approx(float(reference), rel=1e-5)
    align, uniform = np_nt_xent_terms(z1, z2, 0.25)
    assert float(split.align) == pytest.approx(align, rel=1e-5)
    assert float(split.uniform) == pytest.approx(uniform, rel=1e-5)


def test_msc_gradient_is_orthogonal_to_phi_minus_center():
    f1, f2, center = random_views(2, b=6, d=9)
    phi1, phi2 = losses.l2_normalize(f1), losses.l2_normalize(f2)
    g1, g2 = jax.jit(jax.grad(losses.mean_shifted_contrastive_loss, argnums=(0, 1)))(
        phi1, phi2, center
    )
    for phi, g in ((phi1, g1), (phi2, g2)):
        shifted = np.asarray(phi) - center
        dots = np.sum(np.asarray(g) * shifted, axis=1)
        scale = np.linalg.norm(np.asarray(g), axis=1) * np.linalg.norm(shifted, axis=1)
        assert np.all(np.abs(dots) <= 1e-5 * scale)
        assert np.all(scale > 1e-3)  # the gradient itself is not zero
    # The Jacobian behind it: d theta / d phi = (I - theta theta^T) / ||phi - c||.
    phi = np.asarray(phi1[0])
    jac = np.asarray(jax.jit(jax.jacobian(lambda p: losses.mean_shift(p, center)))(phi1[0]))
    theta = np_unit(phi - center)
    expected = (np.eye(9) - np.outer(theta, theta)) / np.linalg.norm(phi - center)
    np.testing.assert_allclose(jac, expected, atol=1e-5)


@pytest.mark.parametrize("loss", cond.LOSSES)
def test_feature_gradients_sum_to_the_loss_gradient_and_are_tangent(loss):
    f1, f2, center = random_views(3)
    g_align, g_uniform = cond.feature_gradients(f1, f2, center, loss=loss, temperature=0.25)
    feats = jnp.concatenate([jnp.asarray(f1), jnp.asarray(f2)])

    def total(feats):
        return cond.loss_split(feats[:5], feats[5:], center, loss=loss).total

    np.testing.assert_allclose(g_align + g_uniform, jax.jit(jax.grad(total))(feats), atol=1e-5)
    for g in (g_align, g_uniform):  # norm invariance: each row orthogonal to its feature
        dots = np.sum(np.asarray(g) * np.asarray(feats), axis=1)
        assert np.all(np.abs(dots) < 1e-5 * np.linalg.norm(np.asarray(feats), axis=1))


def test_gradient_balance_on_pytrees_matches_numpy():
    rng = np.random.default_rng(4)
    a = {"w": rng.normal(size=(3, 4)), "b": [rng.normal(size=5), rng.normal(size=())]}
    u = jax.tree_util.tree_map(lambda x: 2.0 * x + rng.normal(size=np.shape(x)), a)
    flat_a = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(a)])
    flat_u = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(u)])
    balance = cond.gradient_balance(a, u)
    assert float(balance.align_norm) == pytest.approx(np.linalg.norm(flat_a), rel=1e-6)
    assert float(balance.uniform_norm) == pytest.approx(np.linalg.norm(flat_u), rel=1e-6)
    cosine = flat_a @ flat_u / np.linalg.norm(flat_a) / np.linalg.norm(flat_u)
    assert float(balance.cosine) == pytest.approx(cosine, abs=1e-6)
    assert float(balance.ratio) == pytest.approx(
        np.linalg.norm(flat_u) / np.linalg.norm(flat_a), rel=1e-6
    )


def test_cone_features_have_the_requested_geometry():
    cone = cone_features(jax.random.key(0), 16, 32, cosine=0.86, view_noise=0.1)
    axis = np.asarray(cone.axis)
    for phi in (cone.phi1, cone.phi2):
        phi = np.asarray(phi, np.float64)
        np.testing.assert_allclose(np.linalg.norm(phi, axis=1), 1.0, atol=1e-6)
        np.testing.assert_allclose(phi @ axis, 0.86, atol=1e-6)
    np.testing.assert_allclose(np.asarray(cone.center), 0.86 * axis, atol=1e-7)
    assert float(cond.compactness(cone.phi1, cone.center)) == pytest.approx(0.86, abs=1e-6)
    with pytest.raises(ValueError, match="cosine"):
        cone_features(jax.random.key(0), 4, 8, cosine=1.0)


def _ratio(cone, loss):
    return float(cond.feature_gradient_balance(cone.phi1, cone.phi2, cone.center, loss=loss).ratio)


def test_uniformity_dominates_the_standard_loss_but_not_msc_in_a_cone():
    # SPEC §10: features with mean cos 0.86 to the center, batch 64, tau 0.25.
    cone = cone_features(jax.random.key(1), 64, 128, cosine=0.86, view_noise=0.05)
    standard, msc = _ratio(cone, "contrastive"), _ratio(cone, "msc")
    assert standard > 10
    assert 0.5 < msc < 2
    # The gap does not hinge on the view noise: both ratios scale alike with it.
    for noise in (0.02, 0.1, 0.3):
        cone = cone_features(jax.random.key(2), 64, 128, cosine=0.86, view_noise=noise)
        assert _ratio(cone, "contrastive") > 5 * _ratio(cone, "msc")


def test_bad_input_is_named():
    f1, f2, center = random_views(5)
    with pytest.raises(ValueError, match="unknown loss"):
        cond.loss_split(f1, f2, center, loss="simclr")
    with pytest.raises(ValueError, match="needs the center"):
        cond.loss_split(f1, f2, None, loss="msc")
    with pytest.raises(ValueError, match="equal shape"):
        cond.loss_split(f1, f2[:3], center, loss="contrastive")
