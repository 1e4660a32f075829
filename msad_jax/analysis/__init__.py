"""Analysis of MSC's conditioning argument (SPEC §10) with jax.grad, jax.jvp and jax.hessian."""
