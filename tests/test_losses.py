import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msad_jax import losses

TAU = 0.25

# jitted once per input shape: much cheaper on CPU than op-by-op dispatch
contrastive_loss = jax.jit(losses.contrastive_loss)
msc_loss = jax.jit(losses.mean_shifted_contrastive_loss)
angular_loss = jax.jit(losses.angular_center_loss)
align_uniform = jax.jit(losses.align_uniform_terms)
mean_shift = jax.jit(losses.mean_shift)
l2_normalize = jax.jit(losses.l2_normalize)


def np_normalize(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_nt_xent(z1, z2, tau=TAU, mask=None):
    """Explicit-loop NT-Xent in float64: returns (loss, align, uniform)."""
    z1, z2 = np_normalize(z1), np_normalize(z2)
    if mask is not None:
        z1, z2 = z1[mask], z2[mask]
    b = z1.shape[0]
    z = np.concatenate([z1, z2])
    aligns, unifs = [], []
    for i in range(2 * b):
        p = (i + b) % (2 * b)
        denominator = 0.0
        for j in range(2 * b):
            if j != i:
                denominator += np.exp(np.dot(z[i], z[j]) / tau)
        aligns.append(-np.dot(z[i], z[p]) / tau)
        unifs.append(np.log(denominator))
    align, unif = float(np.mean(aligns)), float(np.mean(unifs))
    return align + unif, align, unif


def np_msc(phi1, phi2, center, tau=TAU, mask=None):
    c = np.asarray(center, np.float64)
    return np_nt_xent(np.asarray(phi1, np.float64) - c, np.asarray(phi2, np.float64) - c, tau, mask)


def random_views(seed, b=8, d=16):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(b, d)).astype(np.float32),
        rng.normal(size=(b, d)).astype(np.float32),
    )


def near_center(seed, b=8, d=32, radius=0.05):
    """Unit features all within `radius` of a unit center (as random-init networks give)."""
    rng = np.random.default_rng(seed)
    center = np_normalize(rng.normal(size=d))

    def view():
        delta = rng.normal(size=(b, d))
        delta *= (
            rng.uniform(0.3, 0.9, size=(b, 1)) * radius / np.linalg.norm(delta, axis=1)[:, None]
        )
        return np_normalize(center + delta).astype(np.float32)

    phi1, phi2 = view(), view()
    assert np.linalg.norm(phi1 - center, axis=1).max() < radius
    return phi1, phi2, center.astype(np.float32)


def test_l2_normalize_is_x_over_max_norm_eps_including_zero_rows():
    x = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
    x[2] = 0.0
    x[3] *= 1e-14  # below eps: divided by eps (torch.nn.functional.normalize semantics)
    got = np.asarray(l2_normalize(x))
    x64 = x.astype(np.float64)
    want = x64 / np.maximum(np.linalg.norm(x64, axis=-1, keepdims=True), 1e-12)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    np.testing.assert_allclose(got[3], x64[3] * 1e12, rtol=1e-6)
    grad = jax.jit(jax.grad(lambda v: jnp.sum(losses.l2_normalize(v) * 3.0)))(x)
    assert np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_contrastive_loss_matches_numpy_on_random_inputs(seed):
    z1, z2 = random_views(seed)
    want, want_align, want_unif = np_nt_xent(z1, z2)
    assert float(contrastive_loss(z1, z2, TAU)) == pytest.approx(want, abs=1e-6)
    align, unif = align_uniform(l2_normalize(z1), l2_normalize(z2), TAU)
    assert float(align) == pytest.approx(want_align, abs=1e-6)
    assert float(unif) == pytest.approx(want_unif, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_msc_loss_matches_numpy_on_random_inputs(seed):
    phi1, phi2 = (np_normalize(v).astype(np.float32) for v in random_views(seed))
    center = np.mean(np.concatenate([phi1, phi2]), axis=0).astype(np.float32)
    want, _, _ = np_msc(phi1, phi2, center)
    got = float(msc_loss(phi1, phi2, center, TAU))
    assert got == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_losses_match_numpy_on_nearly_collinear_inputs(seed):
    phi1, phi2, center = near_center(seed)
    want_msc, msc_align, msc_unif = np_msc(phi1, phi2, center)
    got = float(msc_loss(phi1, phi2, center, TAU))
    assert got == pytest.approx(want_msc, abs=1e-6)
    align, unif = align_uniform(mean_shift(phi1, center), mean_shift(phi2, center), TAU)
    assert float(align) == pytest.approx(msc_align, abs=1e-6)
    assert float(unif) == pytest.approx(msc_unif, abs=1e-6)
    # standard loss on the (nearly collinear) phi themselves
    want_std, _, _ = np_nt_xent(phi1, phi2)
    assert float(contrastive_loss(phi1, phi2, TAU)) == pytest.approx(want_std, abs=1e-6)


@pytest.mark.parametrize("b", [1, 4, 16])
def test_collapsed_batch_gives_log_2b_minus_1(b):
    v = np.random.default_rng(b).normal(size=(1, 10)).astype(np.float32)
    z = np.repeat(v, b, axis=0)
    expected = np.log(2 * b - 1)
    assert float(contrastive_loss(z, z, TAU)) == pytest.approx(expected, abs=1e-6)
    phi = np_normalize(z).astype(np.float32)
    center = np.full((10,), 0.1, np.float32)
    got = float(msc_loss(phi, phi, center, TAU))
    assert got == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("near", [False, True])
def test_align_plus_uniform_equals_loss(near):
    if near:
        phi1, phi2, center = near_center(8)
        n1, n2 = mean_shift(phi1, center), mean_shift(phi2, center)
        loss = msc_loss(phi1, phi2, center, TAU)
    else:
        z1, z2 = random_views(7)
        z2 = z1 + 0.5 * z2  # correlated views: alignment is far from 0
        n1, n2 = l2_normalize(z1), l2_normalize(z2)
        loss = contrastive_loss(z1, z2, TAU)
    align, unif = align_uniform(n1, n2, TAU)
    assert float(align + unif) == pytest.approx(float(loss), abs=1e-6)
    assert abs(float(align)) > 0.1 and abs(float(unif)) > 0.1


def test_masked_rows_take_no_part():
    z1, z2 = random_views(3, b=10)
    mask = np.array([1, 1, 0, 1, 1, 0, 1, 1, 1, 0], bool)
    garbage1, garbage2 = z1.copy(), z2.copy()
    garbage1[~mask] = 1e3  # padding content must not matter
    garbage2[~mask] = -7.0
    padded = float(contrastive_loss(garbage1, garbage2, TAU, mask=mask))
    unpadded = float(contrastive_loss(z1[mask], z2[mask], TAU))
    assert padded == pytest.approx(unpadded, abs=1e-6)
    assert padded == pytest.approx(np_nt_xent(z1, z2, mask=mask)[0], abs=1e-6)

    center = np.full((16,), 0.05, np.float32)
    p1, p2 = np_normalize(garbage1).astype(np.float32), np_normalize(garbage2).astype(np.float32)
    msc_padded = float(msc_loss(p1, p2, center, TAU, mask=mask))
    msc_unpadded = float(msc_loss(p1[mask], p2[mask], center, TAU))
    assert msc_padded == pytest.approx(msc_unpadded, abs=1e-6)
    ang_padded = float(angular_loss(p1, p2, center, mask=mask))
    assert ang_padded == pytest.approx(float(angular_loss(p1[mask], p2[mask], center)), abs=1e-6)

    # padded rows receive exactly zero gradient, valid rows do not
    g1, g2 = jax.jit(jax.grad(msc_loss, (0, 1)))(p1, p2, center, TAU, mask)
    assert np.all(np.asarray(g1)[~mask] == 0) and np.all(np.asarray(g2)[~mask] == 0)
    assert np.all(np.abs(np.asarray(g1)[mask]).sum(axis=1) > 0)


def test_fully_padded_batch_is_finite_with_finite_gradient():
    z1, z2 = random_views(4, b=3)
    mask = np.zeros(3, bool)
    loss, grads = jax.jit(jax.value_and_grad(contrastive_loss))(z1, z2, TAU, mask)
    assert float(loss) == 0.0
    assert np.all(np.asarray(grads) == 0)


@pytest.mark.parametrize("near", [False, True])
def test_msc_gradient_wrt_phi_is_orthogonal_to_phi_minus_center(near):
    if near:
        phi1, phi2, center = near_center(11)
    else:
        phi1, phi2 = (np_normalize(v).astype(np.float32) for v in random_views(11))
        center = (0.5 * np_normalize(np.ones(16))).astype(np.float32)
    g1, g2 = jax.jit(jax.grad(msc_loss, (0, 1)))(phi1, phi2, center, TAU)
    for g, phi in ((np.asarray(g1, np.float64), phi1), (np.asarray(g2, np.float64), phi2)):
        shifted = np.asarray(phi, np.float64) - center
        cos = np.sum(g * shifted, axis=1) / (
            np.linalg.norm(g, axis=1) * np.linalg.norm(shifted, axis=1)
        )
        assert np.all(np.linalg.norm(g, axis=1) > 0)
        assert np.max(np.abs(cos)) < 1e-5, cos
    # whereas the standard loss's gradient w.r.t. phi has a component along phi - c
    g_std = np.asarray(jax.jit(jax.grad(contrastive_loss))(phi1, phi2, TAU))
    shifted = np.asarray(phi1, np.float64) - center
    cos_std = np.sum(g_std * shifted, axis=1) / (
        np.linalg.norm(g_std, axis=1) * np.linalg.norm(shifted, axis=1)
    )
    assert np.max(np.abs(cos_std)) > 1e-3


def test_angular_center_loss_matches_numpy_and_dot_form():
    rng = np.random.default_rng(5)
    phi1 = np_normalize(rng.normal(size=(6, 9))).astype(np.float32)
    phi2 = np_normalize(rng.normal(size=(6, 9))).astype(np.float32)
    c = np_normalize(rng.normal(size=9)).astype(np.float32)
    want = sum(np.sum((p.astype(np.float64) - c) ** 2, axis=1).mean() for p in (phi1, phi2))
    got = float(angular_loss(phi1, phi2, c))
    assert got == pytest.approx(want, abs=1e-6)
    dot_form = 4 - 2 * (np.mean(phi1 @ c) + np.mean(phi2 @ c))
    assert got == pytest.approx(dot_form, abs=1e-5)


def test_mismatched_views_raise_clear_error():
    z1, z2 = random_views(0)
    with pytest.raises(ValueError, match="two views"):
        losses.contrastive_loss(z1, z2[:4])
    with pytest.raises(ValueError, match="mask must have shape"):
        losses.contrastive_loss(z1, z2, mask=np.ones(3, bool))


def test_nt_xent_rows_of_a_subset_of_anchors_equals_full_batch_rows():
    # the multi-device step evaluates only its local anchors against the global candidates
    z1, z2 = (np.asarray(l2_normalize(v)) for v in random_views(9, b=6))
    z = np.concatenate([z1, z2])
    rows = np.arange(12)
    positives = (rows + 6) % 12
    rows_fn = jax.jit(losses.nt_xent_rows)
    full = rows_fn(z, z, rows, positives)
    part = rows_fn(z[[1, 2, 7, 8]], z, rows[[1, 2, 7, 8]], positives[[1, 2, 7, 8]])
    for got, want in zip(part, full, strict=True):
        np.testing.assert_allclose(got, np.asarray(want)[[1, 2, 7, 8]], rtol=1e-6)
    align, unif, loss = (np.asarray(t) for t in full)
    np.testing.assert_allclose(align + unif, loss, rtol=1e-6)
