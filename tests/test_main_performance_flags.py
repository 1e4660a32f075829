"""The opt-in CPU convolution switch of ``msad_jax.main`` (``--cpu_eigen_convolutions``)."""

import json
import os
import subprocess
import sys
import textwrap

from msad_jax import main

# Run in a fresh interpreter: XLA reads XLA_FLAGS once, when the CPU backend starts, and aborts
# the process on a flag it does not know (so this also guards against a jaxlib that dropped it).
CHILD = textwrap.dedent(
    """
    import json
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 9, 4)).astype(np.float32)
    w = rng.standard_normal((3, 3, 4, 5)).astype(np.float32)
    g = rng.standard_normal((2, 5, 5, 5)).astype(np.float32)

    def conv(x, w):
        return lax.conv_general_dilated(
            x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    y, vjp = jax.vjp(conv, jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(g))
    print(json.dumps({"y": np.asarray(y).tolist(), "dw": np.asarray(dw).tolist()}))
    """
)


def _reference():
    """NumPy oracle: the strided 3x3 convolution and its weight gradient."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 9, 4)).astype(np.float64)
    w = rng.standard_normal((3, 3, 4, 5)).astype(np.float64)
    g = rng.standard_normal((2, 5, 5, 5)).astype(np.float64)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = np.zeros((2, 5, 5, 5))
    dw = np.zeros_like(w)
    for i in range(3):
        for j in range(3):
            patch = xp[:, i : i + 9 : 2, j : j + 9 : 2, :]  # [2, 5, 5, 4]
            y += np.einsum("nhwc,co->nhwo", patch, w[i, j])
            dw[i, j] = np.einsum("nhwc,nhwo->co", patch, g)
    return y, dw


def test_switch_adds_the_flag_once_and_respects_an_explicit_setting(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    main.use_eigen_convolutions()
    main.use_eigen_convolutions()
    flags = os.environ["XLA_FLAGS"].split()
    assert flags == ["--xla_force_host_platform_device_count=2", main.EIGEN_CONVOLUTIONS_FLAG]

    explicit = "--xla_cpu_experimental_ynn_fusion_type=dot"
    monkeypatch.setenv("XLA_FLAGS", explicit)
    main.use_eigen_convolutions()
    assert os.environ["XLA_FLAGS"] == explicit


def test_this_jaxlib_accepts_the_flag_and_convolutions_stay_exact():
    import numpy as np

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": main.EIGEN_CONVOLUTIONS_FLAG}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    y, dw = _reference()
    np.testing.assert_allclose(np.asarray(got["y"]), y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(got["dw"]), dw, rtol=1e-4, atol=1e-4)
