"""The configuration schema of a run: every key, its default and its meaning, and validation.

Config files under ``configs/`` start from :func:`default_config` and change what they need, so
every run's configuration has exactly these keys. :func:`validate_config` rejects unknown keys
(listing the valid ones) and impossible values with one-line :class:`ConfigError` messages.

Defaults reproduce the published recipe (SPEC §2-7): ResNet-152, MSC loss with temperature 0.25,
SGD without momentum at learning rate 1e-5 with weight decay 5e-5, batch 64, 20 epochs, kNN with
k = 2 on the normal training images.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax.numpy as jnp
import ml_collections

from msad_jax.data.registry import DATASETS
from msad_jax.errors import InputError
from msad_jax.losses import LOSSES
from msad_jax.models import list_backbones
from msad_jax.preprocessing import METHODS

# Keys of earlier versions, still accepted: what each became.
LEGACY_KEYS = {"threshold_quantile": "threshold_fpr"}
DTYPES = ("float32", "bfloat16")
AUGMENTS = ("device", "pil")
EVAL_RESIZES = ("float", "pil")


class ConfigError(InputError):
    """A configuration is invalid; the message names the key and what to do."""


def default_config() -> ml_collections.ConfigDict:
    """Every configuration key with its default (the published CIFAR-10 recipe)."""
    c = ml_collections.ConfigDict()
    # Data (SPEC §8).
    c.dataset = "cifar10"  # one of msad_jax.data.DATASETS
    c.normal_class = "0"  # class index or name (a string), or "all" for every class in turn
    c.data_dir = ""  # TFDS data_dir ('' = TFDS default); for 'folder': the directory or .zip
    c.manual_dir = ""  # TFDS manual download directory ('' = <data_dir>/downloads/manual)
    c.download = True  # let TFDS prepare a missing dataset (needs TensorFlow and the internet)
    # Resize stored images to this square side (shorter side + center crop). 0 = automatic:
    # folders/zips: images larger than 256 or of mixed sizes become 256x256 while decoding,
    # one common size up to 256 is kept; TFDS: native size (CatsVsDogs: 256).
    c.image_size = 0
    c.train_images = 0  # use a seeded subset of this many training images (0 = all; not SPEC)
    c.test_images = 0  # use a seeded, class-stratified subset of test images (0 = all; not SPEC)
    c.synthetic_size = 32  # 'synthetic' only: image side
    c.synthetic_train = 200  # 'synthetic' only: training images per class
    c.synthetic_test = 40  # 'synthetic' only: test images per class
    # Model (SPEC §2).
    c.backbone = "resnet152"
    c.pretrained = True  # ImageNet weights; False = random init (smoke tests only)
    c.weights_cache = ""  # '' = $MSAD_JAX_CACHE or ~/.cache/msad_jax
    c.offline = False  # never download weights (also MSAD_JAX_OFFLINE=1)
    # Frozen parameters: 'default' = the backbone's (SPEC §2), or a tuple of regexes of parameter
    # paths, e.g. ('^conv1/', '^layer1/'); () = none. A string of comma-separated regexes is read
    # too (the form of earlier versions; a comma inside {m,n} does not separate).
    c.frozen = ml_collections.FieldReference("default", field_type=object)
    c.dtype = "float32"  # compute dtype: 'float32' or 'bfloat16' (parameters stay float32)
    # Preprocessing overrides (0 / '' = the backbone's evaluation transform, SPEC §6).
    c.resize = 0
    c.crop = -1  # -1 = backbone default, 0 = no crop, >0 = center-crop side
    c.resize_method = ""
    # 'float': resize on device in float32, never rounded; 'pil': Pillow on the host, rounded to
    # uint8 after resizing, as torchvision's Resize on PIL images (msad_jax.data.pil_eval).
    c.eval_resize = "float"
    # Training views (SPEC §6): 'device' = MoCo-v2 on the accelerator inside the step
    # (msad_jax.data.augment); 'pil' = torchvision's MoCo-v2 with Pillow on the host, 8-bit
    # like the reference (msad_jax.data.pil_augment), in augment_workers threads (0 = all cores).
    c.augment = "device"
    c.augment_workers = 0
    # Loss and optimisation (SPEC §4-5).
    c.loss = "msc"  # 'msc' (mean-shifted) or 'contrastive' (standard NT-Xent, for comparison)
    c.angular = False  # add the angular center term
    c.temperature = 0.25
    c.learning_rate = 1e-5
    c.weight_decay = 5e-5
    c.batch_size = 64  # global batch (all devices, all hosts)
    c.epochs = 20
    c.max_steps = 0  # stop after this many training steps in total (0 = no limit)
    c.seed = 0
    # Evaluation (SPEC §7).
    c.knn_k = 2
    c.eval_batch_size = 256  # global batch for feature extraction
    c.eval_every_epochs = 1  # 0 = only at epoch 0 and at the end
    c.knn_memory_budget_mb = 256
    # Decision threshold (Detector.predict, score/export commands), from normal images only
    # (msad_jax.calibration): the target false-positive rate on normal images...
    c.threshold_fpr = 0.05
    # ...set from the leave-one-out kNN scores of the gallery (0), or from this fraction of the
    # normal training images, held out from training and from the gallery (not SPEC: fewer
    # training images; for long fine-tuning, see benchmarks/results/threshold_calibration.md).
    c.calibration_holdout = 0.0
    # Checkpoints and logging.
    c.checkpoint_every_steps = 200  # also at the end of every epoch; 0 = epoch ends only
    c.keep_checkpoints = 2
    c.log_every_steps = 10
    c.progress = True  # tqdm progress bars
    c.plots = True  # ROC curve, score histograms, training curves (matplotlib)
    return c


def _flat_keys(config: Mapping[str, Any]) -> list[str]:
    return sorted(config.keys())


def check_keys(keys: Iterable[str]) -> None:
    """Raises ConfigError for keys that are not part of :func:`default_config`."""
    valid = set(_flat_keys(default_config()))
    unknown = sorted(set(keys) - valid - set(LEGACY_KEYS))
    if unknown:
        raise ConfigError(
            f"Unknown config key(s) {', '.join(unknown)}; valid keys are: "
            f"{', '.join(sorted(valid))}."
        )


def _choice(config: ml_collections.ConfigDict, key: str, valid: Iterable[str]) -> None:
    valid = tuple(valid)
    if config[key] not in valid:
        raise ConfigError(f"config.{key}={config[key]!r} is not one of {', '.join(valid)}.")


def _positive(config: ml_collections.ConfigDict, *keys: str, allow_zero: bool = False) -> None:
    for key in keys:
        value = config[key]
        if value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise ConfigError(f"config.{key}={value} must be {bound}.")


def _fold_threshold_quantile(config: ml_collections.ConfigDict) -> None:
    """Sets ``threshold_fpr = 1 - threshold_quantile`` for configs of earlier versions.

    ``threshold_quantile = q`` set the threshold at the ``q`` quantile of the normal training
    scores, i.e. at a false-positive rate of ``1 - q``.
    """
    if "threshold_quantile" not in config:
        return
    quantile = config.threshold_quantile
    if not 0.0 < quantile < 1.0:
        raise ConfigError(f"config.threshold_quantile={quantile} must lie in (0, 1).")
    fpr = round(1.0 - quantile, 12)
    default = default_config().threshold_fpr
    if config.threshold_fpr not in (default, fpr):
        raise ConfigError(
            f"config.threshold_quantile={quantile} (an earlier name: threshold_fpr = 1 - "
            f"quantile = {fpr:g}) contradicts config.threshold_fpr={config.threshold_fpr}; "
            "set only config.threshold_fpr."
        )
    config.threshold_fpr = fpr


def frozen_setting(value: Any) -> str | tuple[str, ...]:
    """``config.frozen`` as ``'default'`` or a tuple of regexes (see :func:`default_config`).

    Raises:
      ConfigError: neither a string nor a sequence of strings.
    """
    if isinstance(value, str):
        if value.strip() == "default":
            return "default"
        parts = re.split(r",(?![^{]*\})", value)  # commas outside {m,n}
        return tuple(part.strip() for part in parts if part.strip())
    if isinstance(value, tuple | list) and all(isinstance(part, str) for part in value):
        return tuple(value)
    raise ConfigError(
        f"config.frozen={value!r}: use 'default', or a tuple of regexes such as "
        "('^conv1/', '^layer1/')."
    )


def compute_dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
    """The model's compute dtype (``config.dtype``)."""
    return jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32


def validate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks keys and values of a run configuration.

    Args:
      config: a configuration derived from :func:`default_config`.

    Returns:
      The same configuration (for chaining).

    Raises:
      ConfigError: naming the first problem found and how to fix it.
    """
    check_keys(config.keys())
    defaults = default_config()
    for key in defaults:
        if key not in config:
            raise ConfigError(
                f"config.{key} is missing; start config files from "
                "msad_jax.config.default_config()."
            )
    _choice(config, "dataset", DATASETS)
    frozen_setting(config.frozen)
    _choice(config, "backbone", list_backbones())
    _choice(config, "loss", LOSSES)
    _choice(config, "dtype", DTYPES)
    if config.resize_method:
        _choice(config, "resize_method", METHODS)
    _choice(config, "augment", AUGMENTS)
    _choice(config, "eval_resize", EVAL_RESIZES)
    _positive(config, "temperature", "batch_size", "eval_batch_size", "knn_k")
    _positive(config, "knn_memory_budget_mb", "keep_checkpoints", "log_every_steps")
    _positive(config, "synthetic_size", "synthetic_train", "synthetic_test")
    _positive(
        config,
        "epochs",
        "max_steps",
        "learning_rate",
        "weight_decay",
        "eval_every_epochs",
        "checkpoint_every_steps",
        "image_size",
        "resize",
        "train_images",
        "test_images",
        "augment_workers",
        allow_zero=True,
    )
    _fold_threshold_quantile(config)
    if not 0.0 < config.threshold_fpr < 1.0:
        raise ConfigError(
            f"config.threshold_fpr={config.threshold_fpr} must lie in (0, 1) (0.05 = 5% of "
            "normal images flagged)."
        )
    if not 0.0 <= config.calibration_holdout < 1.0:
        raise ConfigError(
            f"config.calibration_holdout={config.calibration_holdout} must lie in [0, 1) "
            "(0 = leave-one-out scores of the gallery)."
        )
    if config.crop < -1:
        raise ConfigError(f"config.crop={config.crop}: use -1 (default), 0 (no crop) or a size.")
    if config.dataset == "folder" and not config.data_dir:
        raise ConfigError(
            "config.dataset='folder' needs config.data_dir=<directory or .zip of images>."
        )
    if not str(config.normal_class):
        raise ConfigError("config.normal_class is empty: give a class index or name, or 'all'.")
    return config
