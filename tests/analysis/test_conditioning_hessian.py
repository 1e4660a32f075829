"""The feature Hessian: exact block reduction, tangent treatment, finite-difference oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msad_jax.analysis import conditioning as cond
from msad_jax.analysis import hessian


def np_loss(rows, b, center, loss, tau=0.25):
    """NumPy NT-Xent of raw features [..., 2B, D] (batched over leading axes)."""
    z = rows / np.linalg.norm(rows, axis=-1, keepdims=True)
    if loss == "msc":
        z = z - center
        z = z / np.linalg.norm(z, axis=-1, keepdims=True)
    n = 2 * b
    sims = np.einsum("...id,...jd->...ij", z, z) / tau
    positive = np.take_along_axis(
        sims, ((np.arange(n) + b) % n)[None, :, None].repeat(len(sims), 0), -1
    )[..., 0]
    sims = np.where(np.eye(n, dtype=bool), -np.inf, sims)
    top = sims.max(-1, keepdims=True)
    lse = top[..., 0] + np.log(np.exp(sims - top).sum(-1))
    return np.mean(lse - positive, axis=-1)


def problem(seed, b=2, d=7):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=d) * 2.0
    f = base + rng.normal(size=(2 * b, d))
    phi = f / np.linalg.norm(f, axis=1, keepdims=True)
    center = phi.mean(0) + 0.05 * rng.normal(size=d)
    return phi[:b], phi[b:], center


@pytest.mark.parametrize("loss", cond.LOSSES)
def test_block_reduction_equals_the_full_tangent_hessian(loss):
    with jax.enable_x64(True):
        f1, f2, center = (jnp.asarray(x) for x in problem(0, b=3, d=11))
        full = hessian.feature_hessian(f1, f2, center, loss=loss)
        phi = np.concatenate([f1, f2])
        expected = hessian.tangent_eigenvalues(np.asarray(full), phi)
        spectrum = hessian.hessian_spectrum(f1, f2, center, loss=loss)
    assert spectrum.dimension == 6 * 10 == int(spectrum.multiplicities.sum())
    assert spectrum.span_rank == 7  # 2B features and the center
    np.testing.assert_allclose(spectrum.all_eigenvalues(), expected, atol=1e-10)
    # float32 (what the study uses) agrees with float64 to float32 accuracy.
    single = hessian.hessian_spectrum(
        *(jnp.asarray(np.asarray(x), jnp.float32) for x in (f1, f2, center)), loss=loss
    )
    np.testing.assert_allclose(
        single.all_eigenvalues(), expected, atol=1e-4 * np.abs(expected).max()
    )
    # D - k copies of the orthogonal block: multiplicity 11 - k.
    assert spectrum.multiplicities.max() == 11 - spectrum.span_rank


@pytest.mark.parametrize("loss", cond.LOSSES)
def test_eigenvalues_agree_with_finite_differences(loss):
    b, d, h = 2, 7, 1e-4
    f1, f2, center = problem(1, b=b, d=d)
    x0 = np.concatenate([f1, f2]).reshape(-1)
    n = x0.size
    eye = np.eye(n) * h
    # Central second differences of the NumPy loss: H_ab ~ [L(++) - L(+-) - L(-+) + L(--)] / 4h^2.
    points = np.stack(
        [
            x0 + sa * eye[:, None, :] + sb * eye[None, :, :]
            for sa, sb in ((1, 1), (1, -1), (-1, 1), (-1, -1))
        ]
    ).reshape(-1, 2 * b, d)
    values = np_loss(points, b, center, loss).reshape(4, n, n)
    fd = (values[0] - values[1] - values[2] + values[3]) / (4 * h * h)
    basis = hessian.tangent_basis(np.concatenate([f1, f2]))
    fd_tangent = np.linalg.eigvalsh(basis.T @ (0.5 * (fd + fd.T)) @ basis)[::-1]
    with jax.enable_x64(True):
        spectrum = hessian.hessian_spectrum(
            jnp.asarray(f1), jnp.asarray(f2), jnp.asarray(center), loss=loss
        )
    np.testing.assert_allclose(spectrum.all_eigenvalues(), fd_tangent, atol=2e-5 * spectrum.max_abs)


def test_radial_directions_are_not_null_in_the_raw_hessian_hence_the_tangent_restriction():
    with jax.enable_x64(True):
        f1, f2, center = (jnp.asarray(x) for x in problem(2, b=2, d=5))
        full = np.asarray(hessian.feature_hessian(f1, f2, center, loss="contrastive"))
        g_align, g_uniform = cond.feature_gradients(f1, f2, loss="contrastive")
    phi = np.concatenate([f1, f2])
    grad = np.asarray(g_align + g_uniform)
    for i in range(4):  # H (e_i x phi_i) = -(e_i x grad_i L) at unit features
        radial = np.zeros(phi.size)
        radial[i * 5 : (i + 1) * 5] = phi[i]
        expected = np.zeros(phi.size)
        expected[i * 5 : (i + 1) * 5] = -grad[i]
        np.testing.assert_allclose(full @ radial, expected, atol=1e-10)
    basis = hessian.tangent_basis(phi)
    np.testing.assert_allclose(basis.T @ basis, np.eye(4 * 4), atol=1e-12)
    for i in range(4):
        assert np.abs(phi[i] @ basis[i * 5 : (i + 1) * 5]).max() < 1e-12


def test_spectrum_summary_counts_with_multiplicity():
    spectrum = hessian.HessianSpectrum(
        eigenvalues=np.array([4.0, 1.0, 1e-9, -2.0]),
        multiplicities=np.array([1, 3, 2, 5]),
        dimension=11,
        span_rank=3,
        null_rtol=1e-6,
    )
    assert spectrum.num_null == 2
    assert spectrum.num_negative == 5
    assert spectrum.condition_number == pytest.approx(4.0)
    assert spectrum.top(3) == [4.0, 1.0, 1.0]
    assert spectrum.summary()["min_eigenvalue"] == -2.0
