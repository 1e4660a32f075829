"""Configuration of the conditioning study: the run schema plus a few study keys.

Study keys (defaults in :data:`STUDY_DEFAULTS`): ``study_losses`` (comma-separated losses trained
side by side), ``probe_size`` (images of the fixed probe batch), ``hessian_size`` (its first
images used for the feature Hessian), ``hessian_top`` (top eigenvalues recorded) and
``uniformity_samples`` (gallery rows for uniformity). Of the run keys, ``loss`` is ignored,
``angular`` must be False and ``normal_class`` a single class; checkpoint and threshold keys are
unused (a study is not resumable: rerun it).
"""

from __future__ import annotations

from collections.abc import Iterable

import ml_collections

from msad_jax.config import ConfigError, default_config, validate_config
from msad_jax.losses import LOSSES

STUDY_DEFAULTS: dict[str, object] = {
    "study_losses": "contrastive,msc",
    "probe_size": 32,
    "hessian_size": 8,
    "hessian_top": 5,
    "uniformity_samples": 5000,
}


def study_config() -> ml_collections.ConfigDict:
    """Every key of a study configuration with its default."""
    config = default_config()
    for key, value in STUDY_DEFAULTS.items():
        config[key] = value
    return config


def check_study_keys(keys: Iterable[str]) -> None:
    """Raises ConfigError for keys that are neither run keys nor study keys."""
    valid = set(default_config().keys()) | set(STUDY_DEFAULTS)
    unknown = sorted(set(keys) - valid)
    if unknown:
        raise ConfigError(
            f"Unknown config key(s) {', '.join(unknown)}; valid keys are: "
            f"{', '.join(sorted(valid))}."
        )


def study_losses(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The losses of ``config.study_losses``, in order."""
    return tuple(part.strip() for part in str(config.study_losses).split(",") if part.strip())


def run_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The run-schema part of a study configuration (study keys removed)."""
    base = default_config()
    for key in list(base):
        if key in config:
            base[key] = config[key]
    return base


def validate_study_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks a study configuration (start config files from :func:`study_config`).

    Raises:
      ConfigError: naming the first problem and how to fix it.
    """
    check_study_keys(config.keys())
    for key in STUDY_DEFAULTS:
        if key not in config:
            raise ConfigError(
                f"config.{key} is missing; start study config files from "
                "msad_jax.analysis.study_config.study_config()."
            )
    validate_config(run_config(config))
    losses = study_losses(config)
    if not losses or any(loss not in LOSSES for loss in losses) or len(set(losses)) < len(losses):
        raise ConfigError(
            f"config.study_losses={config.study_losses!r} must list distinct losses from "
            f"{', '.join(LOSSES)}, comma-separated (e.g. 'contrastive,msc')."
        )
    for key in ("probe_size", "hessian_size", "hessian_top"):
        if config[key] < 1:
            raise ConfigError(f"config.{key}={config[key]} must be >= 1.")
    if config.uniformity_samples < 2:
        raise ConfigError(f"config.uniformity_samples={config.uniformity_samples} must be >= 2.")
    if config.hessian_size > config.probe_size:
        raise ConfigError(
            f"config.hessian_size={config.hessian_size} exceeds config.probe_size="
            f"{config.probe_size}; the Hessian batch is taken from the probe batch."
        )
    if config.angular:
        raise ConfigError(
            "config.angular=True is not supported by the conditioning study (it measures the "
            "NT-Xent terms only); set config.angular=False."
        )
    if str(config.normal_class) == "all":
        raise ConfigError(
            "config.normal_class='all': the study runs one normal class; give a class index or "
            "name (run the command once per class)."
        )
    return config
