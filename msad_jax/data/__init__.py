"""Data for msad_jax: sources, one-class protocols, host batching, on-device transforms."""

from msad_jax.data.augment import (
    AugmentParams,
    apply_augment_params,
    make_augment_fn,
    sample_augment_params,
    sample_batch_params,
    train_augment,
)
from msad_jax.data.folders import load_folder
from msad_jax.data.images import DEFAULT_IMAGE_SIZE, fit_square
from msad_jax.data.pipeline import (
    epoch_permutation,
    eval_batches,
    prefetch_to_device,
    shard_to_devices,
    steps_per_epoch,
    train_batches,
)
from msad_jax.data.protocols import LabelledArrays, OneClassData, one_class_from_labelled
from msad_jax.data.registry import DATASETS, class_names, load_one_class, num_classes
from msad_jax.data.tfds_sources import CATS_VS_DOGS_SEED, cats_vs_dogs_split, open_tfds
from msad_jax.data.transforms import eval_transform, make_preprocess_fn, normalize
from msad_jax.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

__all__ = [
    "CATS_VS_DOGS_SEED",
    "DATASETS",
    "DEFAULT_IMAGE_SIZE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AugmentParams",
    "LabelledArrays",
    "OneClassData",
    "Preprocessing",
    "apply_augment_params",
    "cats_vs_dogs_split",
    "class_names",
    "epoch_permutation",
    "eval_batches",
    "eval_transform",
    "fit_square",
    "load_folder",
    "load_one_class",
    "make_augment_fn",
    "make_preprocess_fn",
    "normalize",
    "num_classes",
    "one_class_from_labelled",
    "open_tfds",
    "prefetch_to_device",
    "sample_augment_params",
    "sample_batch_params",
    "shard_to_devices",
    "steps_per_epoch",
    "train_augment",
    "train_batches",
]
