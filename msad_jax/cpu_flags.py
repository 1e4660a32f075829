"""The switch of the CPU lowering and the XLA flag it sets (no JAX import: runs before JAX starts).

On the CPU backend msad_jax trains with its own lowering of some layers
(:mod:`msad_jax.models.cpu_lowering`) and with XLA:CPU's Eigen convolutions instead of YNNPACK's
(:data:`EIGEN_CONVOLUTIONS_FLAG`); together they make the training step several times faster
(``benchmarks/RESULTS.md``). Both are on by default and one switch turns both off: the environment
variable :data:`ENV_VAR` set to ``0`` (or ``false``, ``no``, ``off``), or
``python -m msad_jax.main --nocpu_lowering``.

XLA reads ``XLA_FLAGS`` once, when JAX starts its CPU backend, so ``import msad_jax`` adds the
flag (:func:`configure_xla_flags`); code that runs JAX computations before importing msad_jax
keeps XLA's default convolutions (results are the same up to float rounding). GPU and TPU
backends ignore the flag.
"""

from __future__ import annotations

import os

#: Environment variable of the switch; ``0``, ``false``, ``no`` or ``off`` (any case) turns the
#: CPU lowering and the XLA flag off.
ENV_VAR = "MSAD_JAX_CPU_LOWERING"
_OFF = ("0", "false", "no", "off")

#: Takes convolutions away from YNNPACK (XLA:CPU's default in jaxlib 0.10), so that XLA:CPU runs
#: them with Eigen, whose weight gradients are 2-4x faster here.
EIGEN_CONVOLUTIONS_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
_YNN_FUSION_OPTION = "--xla_cpu_experimental_ynn_fusion_type"
_added = False  # whether configure_xla_flags added the flag (switch_off then removes it)


def switched_on() -> bool:
    """Whether :data:`ENV_VAR` allows the CPU lowering (default: yes)."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in _OFF


def configure_xla_flags() -> bool:
    """Adds :data:`EIGEN_CONVOLUTIONS_FLAG` to ``XLA_FLAGS`` when the switch is on.

    Takes effect only if JAX has not started its CPU backend yet. An explicit
    ``--xla_cpu_experimental_ynn_fusion_type`` already in ``XLA_FLAGS`` wins.

    Returns:
      Whether the flag is in ``XLA_FLAGS`` afterwards.
    """
    global _added
    current = os.environ.get("XLA_FLAGS", "")
    if switched_on() and _YNN_FUSION_OPTION not in current:
        os.environ["XLA_FLAGS"] = f"{current} {EIGEN_CONVOLUTIONS_FLAG}".strip()
        _added = True
    return EIGEN_CONVOLUTIONS_FLAG in os.environ.get("XLA_FLAGS", "").split()


def switch_off() -> None:
    """Turns the CPU lowering off for this process (and its children), before JAX starts.

    Sets :data:`ENV_VAR` to ``0`` and takes back the XLA flag if :func:`configure_xla_flags`
    added it (an explicit one stays).
    """
    global _added
    os.environ[ENV_VAR] = "0"
    if _added:
        words = os.environ.get("XLA_FLAGS", "").split()
        os.environ["XLA_FLAGS"] = " ".join(w for w in words if w != EIGEN_CONVOLUTIONS_FLAG)
        _added = False
