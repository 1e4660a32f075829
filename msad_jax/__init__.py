"""msad_jax: Mean-Shifted Contrastive anomaly detection in JAX/Flax."""

from msad_jax import cpu_flags as _cpu_flags

__version__ = "0.1.0"

# Before JAX starts its CPU backend: XLA:CPU's Eigen convolutions (see msad_jax.cpu_flags;
# MSAD_JAX_CPU_LOWERING=0 turns this and the CPU lowering of the models off).
_cpu_flags.configure_xla_flags()
