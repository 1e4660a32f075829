"""Analysis tools: the conditioning argument of MSC via ``jax.grad``, ``jax.jvp``, ``jax.hessian``.

- :mod:`msad_jax.analysis.conditioning`: compactness, uniformity, the alignment/uniformity split
  of both losses, gradient balance w.r.t. features and parameters, radial drift; also the command
  ``python -m msad_jax.analysis.conditioning --config ... --workdir ...``.
- :mod:`msad_jax.analysis.hessian`: spectrum of the tangent feature Hessian.
- :mod:`msad_jax.analysis.synthetic_features`: features in a cone with two views per image.
- :mod:`msad_jax.analysis.study`: the side-by-side training study the command runs.

The names below are imported lazily (on first access), so that running the command with
``python -m`` does not import its module twice.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "conditioning": (
        "LOSSES",
        "GradientBalance",
        "LossSplit",
        "ParameterGradients",
        "compactness",
        "feature_gradient_balance",
        "feature_gradients",
        "gradient_balance",
        "loss_shift",
        "loss_split",
        "parameter_gradients",
        "positive_cosine",
        "radial_drift",
        "tree_norm",
        "uniformity",
        "update_direction",
    ),
    "hessian": (
        "HessianSpectrum",
        "feature_hessian",
        "hessian_spectrum",
        "tangent_basis",
        "tangent_eigenvalues",
    ),
    "synthetic_features": ("ConeFeatures", "cone_features"),
    "study": ("run_study",),
    "study_config": ("study_config", "validate_study_config"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'msad_jax.analysis' has no attribute {name!r}")
    module = importlib.import_module(f"msad_jax.analysis.{_MODULE_OF[name]}")
    return getattr(module, name)


def __dir__() -> list[str]:
    return __all__
