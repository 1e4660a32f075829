"""Analysis of MSC's conditioning argument (SPEC §10) with jax.grad, jax.jvp and jax.hessian.

Nothing is imported here, so ``python -m msad_jax.analysis.conditioning`` imports its module once.
"""
