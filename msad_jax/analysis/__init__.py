"""Analysis of MSC's conditioning argument (SPEC §10) with jax.grad, jax.jvp and jax.hessian.

- :mod:`msad_jax.analysis.conditioning`: compactness, uniformity, the alignment/uniformity split
  of both losses, gradient balance w.r.t. features and parameters, radial drift; also the command
  ``python -m msad_jax.analysis.conditioning --config ... --workdir ...``.
- :mod:`msad_jax.analysis.hessian`: spectrum of the tangent feature Hessian.
- :mod:`msad_jax.analysis.synthetic_features`: features in a cone with two views per image.
- :mod:`msad_jax.analysis.study`: the side-by-side training study the command runs
  (:mod:`~msad_jax.analysis.study_config`, :mod:`~msad_jax.analysis.study_report`,
  :mod:`~msad_jax.analysis.study_cli`).

Nothing is imported here, so that running the command with ``python -m`` imports its module once.
"""
