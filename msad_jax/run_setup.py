"""What a run's configuration means: its classes, data, backbone, preprocessing and identity."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import ml_collections
import numpy as np

from msad_jax import calibration
from msad_jax.config import ConfigError, compute_dtype, frozen_setting
from msad_jax.data import pipeline, subsets
from msad_jax.data.protocols import OneClassData
from msad_jax.data.registry import DataOptions, dataset_spec
from msad_jax.errors import CheckpointError
from msad_jax.models import (
    BackboneSpec,
    backbone_spec,
    build_backbone,
    init_variables,
    load_pretrained,
)
from msad_jax.preprocessing import Preprocessing

PyTree = Any

RESUME_KEYS = (
    "dataset",
    "normal_class",
    "train_images",
    "test_images",
    "backbone",
    "pretrained",
    "frozen",
    "loss",
    "angular",
    "temperature",
    "learning_rate",
    "weight_decay",
    "batch_size",
    "seed",
    "dtype",
    "resize",
    "crop",
    "resize_method",
    "calibration_holdout",
    "augment",
    "eval_resize",
)
"""Config keys that change what a checkpoint means; a resumed run must agree on them."""


def data_options(config: ml_collections.ConfigDict) -> DataOptions:
    """The data source's options from the config (``data_dir`` is a folder's path too)."""
    return DataOptions(
        data_dir=config.data_dir or None,
        path=config.data_dir or None,
        image_size=config.image_size or None,
        download=config.download,
        manual_dir=config.manual_dir or None,
        synthetic_size=config.synthetic_size,
        synthetic_train=config.synthetic_train,
        synthetic_test=config.synthetic_test,
        seed=config.seed,
    )


def class_names(config: ml_collections.ConfigDict) -> list[str]:
    """Names of the dataset's classes (reads folder layouts)."""
    return dataset_spec(config.dataset).class_names(data_options(config))


def normal_classes(config: ml_collections.ConfigDict) -> list[int]:
    """The normal classes to run: one, or all of them for ``normal_class='all'``."""
    names = class_names(config)
    value = str(config.normal_class)
    if value == "all":
        return list(range(len(names)))
    if re.fullmatch(r"\d+", value):
        if int(value) >= len(names):
            raise ConfigError(
                f"config.normal_class={value} is out of range: {config.dataset} has "
                f"{len(names)} classes (0..{len(names) - 1})."
            )
        return [int(value)]
    if value in names:
        return [names.index(value)]
    raise ConfigError(
        f"config.normal_class={value!r} is not a class of {config.dataset}; use an index, 'all', "
        f"or one of {', '.join(names)}."
    )


def load_data(config: ml_collections.ConfigDict, normal_class: int) -> OneClassData:
    """The one-class problem of ``normal_class`` from the configured source (and subset)."""
    data = dataset_spec(config.dataset).load(normal_class, data_options(config))
    return subsets.subsample(
        data, train_images=config.train_images, test_images=config.test_images, seed=config.seed
    )


def split_holdout(
    config: ml_collections.ConfigDict, data: OneClassData
) -> tuple[OneClassData, np.ndarray]:
    """``(data without the held-out images, held-out images)`` for ``calibration_holdout``."""
    if not config.calibration_holdout:
        return data, data.train_images[:0]
    keep, held = calibration.holdout_split(
        len(data.train_images), config.calibration_holdout, config.seed
    )
    return dataclasses.replace(data, train_images=data.train_images[keep]), data.train_images[held]


def check_enough_images(config: ml_collections.ConfigDict, data: OneClassData, held: int) -> None:
    """Refuses a problem too small for ``knn_k`` or for the threshold's false-positive rate."""
    if len(data.train_images) <= config.knn_k:
        raise ConfigError(
            f"config.knn_k={config.knn_k} needs more than {config.knn_k} training images; this "
            f"problem has {len(data.train_images)}: lower config.knn_k or use more images."
        )
    calibrating = held or len(data.train_images)
    needed = calibration.min_calibration_scores(config.threshold_fpr)
    if calibrating < needed:
        what = "held-out" if held else "training"
        raise ConfigError(
            f"config.threshold_fpr={config.threshold_fpr} needs at least {needed} {what} normal "
            f"images to set the threshold from; this run has {calibrating}: raise "
            "config.threshold_fpr"
            + (" or config.calibration_holdout." if held else " or use more images.")
        )


def model_and_variables(
    config: ml_collections.ConfigDict,
) -> tuple[Any, dict[str, PyTree], BackboneSpec]:
    """The backbone (compute dtype from the config), its initial variables and its spec."""
    spec = backbone_spec(config.backbone)
    model = build_backbone(config.backbone, dtype=compute_dtype(config))
    if config.pretrained:
        offline = True if config.offline else None
        variables = load_pretrained(config.backbone, config.weights_cache or None, offline=offline)
    else:
        variables = init_variables(model, spec.preprocessing.size, seed=config.seed)
    return model, variables, spec


def preprocessing_for(config: ml_collections.ConfigDict, spec: BackboneSpec) -> Preprocessing:
    """The backbone's evaluation preprocessing with the config's overrides applied."""
    changes: dict[str, Any] = {}
    if config.resize:
        changes["resize"] = config.resize
    if config.crop >= 0:
        changes["crop"] = config.crop or None
    if config.resize_method:
        changes["method"] = config.resize_method
    try:
        return dataclasses.replace(spec.preprocessing, **changes)
    except ValueError as err:
        raise ConfigError(f"Invalid preprocessing override: {err}") from None


def frozen_patterns(config: ml_collections.ConfigDict, spec: BackboneSpec) -> tuple[str, ...]:
    """Regexes of frozen parameters: the backbone's default or the config's."""
    setting = frozen_setting(config.frozen)
    return spec.frozen if setting == "default" else setting


def training_steps(config: ml_collections.ConfigDict, num_train_images: int) -> tuple[int, int]:
    """``(steps_per_epoch, total_steps)``: the epochs' steps, capped by ``config.max_steps``."""
    steps_per_epoch = pipeline.steps_per_epoch(num_train_images, config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    return steps_per_epoch, total_steps


def _comparable(identity: dict[str, Any]) -> dict[str, Any]:
    """``identity`` as JSON gives it back; ``frozen`` in one form (earlier runs: a string)."""
    if "frozen" in identity:
        setting = frozen_setting(identity["frozen"])
        identity = {**identity, "frozen": setting if setting == "default" else list(setting)}
    return identity


def run_identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What makes a workdir's result what it is; a resumed run must agree on all of it."""
    identity = {key: config[key] for key in RESUME_KEYS}
    identity["image_size"] = config.image_size
    identity.update(dataset_spec(config.dataset).identity(data_options(config)))
    return _comparable(identity)


def saved_identity(record: dict[str, Any]) -> dict[str, Any]:
    """The identity stored in a checkpoint's progress or run.json (earlier runs: their config)."""
    if "identity" in record:
        identity = dict(record["identity"])
    else:
        config = record.get("config", {})
        identity = {key: config[key] for key in RESUME_KEYS if key in config}
    identity.setdefault("calibration_holdout", 0.0)
    return _comparable(identity)


def check_identity(saved: dict[str, Any], identity: dict[str, Any]) -> None:
    """Refuses a workdir whose run differs from ``identity``, naming what differs.

    Raises:
      CheckpointError: with one line for the user.
    """
    changed = [k for k in identity if k in saved and saved[k] != identity[k]]
    if changed:
        details = ", ".join(
            "the data folder's files (names or sizes)"
            if k == "data_files"
            else f"{k}: {saved[k]!r} -> {identity[k]!r}"
            for k in changed
        )
        raise CheckpointError(
            f"The workdir holds a run with a different config ({details}); nothing was written. "
            "Use a new --workdir, or the original settings and data."
        )
