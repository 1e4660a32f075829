"""msad_jax: Mean-Shifted Contrastive anomaly detection in JAX/Flax."""

__version__ = "0.1.0"
