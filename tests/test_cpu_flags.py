"""The CPU lowering's switch and XLA flag (``msad_jax.cpu_flags``, ``--nocpu_lowering``)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from msad_jax import cpu_flags

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


def test_flag_added_once_taken_back_by_the_switch_and_explicit_settings_win(monkeypatch):
    monkeypatch.setattr(cpu_flags, "_added", False)
    monkeypatch.delenv(cpu_flags.ENV_VAR, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert cpu_flags.configure_xla_flags()
    assert cpu_flags.configure_xla_flags()
    flags = os.environ["XLA_FLAGS"].split()
    assert flags == ["--xla_force_host_platform_device_count=2", cpu_flags.EIGEN_CONVOLUTIONS_FLAG]
    cpu_flags.switch_off()
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
    assert not cpu_flags.switched_on()
    assert not cpu_flags.configure_xla_flags()  # switched off: nothing added

    explicit = "--xla_cpu_experimental_ynn_fusion_type=dot"
    monkeypatch.setenv(cpu_flags.ENV_VAR, "1")
    monkeypatch.setenv("XLA_FLAGS", explicit)
    assert not cpu_flags.configure_xla_flags()
    cpu_flags.switch_off()
    assert os.environ["XLA_FLAGS"] == explicit  # not ours to take back


@pytest.mark.parametrize("value", ["0", "off", "False", " no "])
def test_switch_values_that_turn_it_off(monkeypatch, value):
    monkeypatch.setenv(cpu_flags.ENV_VAR, value)
    assert not cpu_flags.switched_on()
    monkeypatch.setenv(cpu_flags.ENV_VAR, "1")
    assert cpu_flags.switched_on()


@pytest.mark.parametrize(("switch", "expected"), [("1", True), ("0", False)])
def test_importing_msad_jax_sets_the_flag_unless_switched_off(switch, expected):
    env = {**os.environ, cpu_flags.ENV_VAR: switch, "XLA_FLAGS": ""}
    code = "import os, msad_jax; print(os.environ['XLA_FLAGS'])"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (cpu_flags.EIGEN_CONVOLUTIONS_FLAG in proc.stdout.split()) is expected


def test_this_jaxlib_accepts_the_flag_and_convolutions_stay_exact():
    import numpy as np

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": cpu_flags.EIGEN_CONVOLUTIONS_FLAG}
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
