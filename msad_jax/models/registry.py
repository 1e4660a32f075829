"""Backbones by name: how to build each one, its preprocessing, frozen layers and weights.

Defaults not fixed by the paper follow the family: ResNet-18/34 resize to 224 bicubic with nothing
frozen; ResNet-50/101/152 resize 256, crop 224, freeze ``conv1``/``bn1``/``layer1``/``layer2``.
ViTs and DINOv2 freeze the patch embedding, tokens, position embeddings and the first half of the
blocks, use their weights' own evaluation transform and suggest a learning rate of 1e-4.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from msad_jax.models import (
    convert,
    efficientnet_lite,
    pretrained,
    resnet,
    vit,
    vit_weights,
    weight_files,
)
from msad_jax.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """What msad_jax knows about one backbone.

    Attributes:
      name: registry name.
      make: builds the Flax module; keyword overrides (``dtype``, ``num_classes``...) pass through.
      preprocessing: evaluation preprocessing (resize/crop/normalisation); training augmentation
        outputs ``preprocessing.size`` pixels with the same normalisation.
      frozen: regex patterns of parameter paths (``'/'``-joined) not trained during fine-tuning.
      weights: pretrained weights file, or None.
      classifier_prefix: torch key prefix of the classifier layer (dropped for feature extraction).
      num_classes: classifier size of the pretrained weights (None: the weights have none).
      layout: key layout of the weights file: ``'torchvision'`` (also EfficientNet-Lite's package)
        or one of :data:`msad_jax.models.vit_weights.LAYOUTS`.
      learning_rate: suggested MSC learning rate when it differs from the published 1e-5 (a starting
        point, not a measured result), or None.
    """

    name: str
    make: Callable[..., nn.Module]
    preprocessing: Preprocessing
    frozen: tuple[str, ...] = ()
    weights: pretrained.WeightsFile | None = None
    classifier_prefix: str = "fc."
    num_classes: int | None = 1000
    layout: str = "torchvision"
    learning_rate: float | None = None


_RESNET_152_STYLE = Preprocessing(
    resize=256, crop=224, method="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD
)
_RESNET_18_STYLE = Preprocessing(
    resize=224, crop=None, method="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD
)
_RESNET_152_FROZEN = ("^conv1/", "^bn1/", "^layer1/", "^layer2/")


def _resnet_spec(name: str) -> BackboneSpec:
    light = name in ("resnet18", "resnet34")
    return BackboneSpec(
        name=name,
        make=lambda **kw: resnet.make_resnet(name, **kw),
        preprocessing=_RESNET_18_STYLE if light else _RESNET_152_STYLE,
        frozen=() if light else _RESNET_152_FROZEN,
        weights=pretrained.RESNET_WEIGHTS[name],
    )


BACKBONES: dict[str, BackboneSpec] = {name: _resnet_spec(name) for name in resnet.RESNET_DEPTHS}


def _efficientnet_spec(variant: str) -> BackboneSpec:
    resolution = efficientnet_lite.efficientnet_lite_config(variant).resolution
    weights = efficientnet_lite.efficientnet_lite_config(variant).weights_file
    return BackboneSpec(
        name=variant,
        make=lambda **kw: efficientnet_lite.EfficientNetLite(variant=variant, **kw),
        preprocessing=Preprocessing(
            resize=resolution + efficientnet_lite.EVAL_CROP_PADDING,
            crop=resolution,
            method=efficientnet_lite.EVAL_RESIZE_METHOD,
            mean=efficientnet_lite.INPUT_MEAN,
            std=efficientnet_lite.INPUT_STD,
        ),
        weights=pretrained.WeightsFile(
            weights,
            sha256_prefix=weights.rsplit("-", 1)[-1].removesuffix(".pth"),
            locate=lambda: efficientnet_lite.efficientnet_lite_weights_path(variant),
        ),
        classifier_prefix="_fc.",
    )


BACKBONES.update({v: _efficientnet_spec(v) for v in efficientnet_lite.EFFICIENTNET_LITE_VARIANTS})
BACKBONES["resnet_tiny"] = BackboneSpec(
    name="resnet_tiny",
    make=lambda **kw: resnet.ResNet(
        stage_sizes=(1, 1, 1, 1), block=resnet.BasicBlock, **{"width": 8, **kw}
    ),
    preprocessing=Preprocessing(
        resize=32, crop=None, method="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD
    ),
    num_classes=10,
)


_TIMM_VIT_STYLE = Preprocessing(
    resize=248, crop=224, method="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
)
_DINOV2_STYLE = Preprocessing(
    resize=256, crop=224, method="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD
)
VIT_LEARNING_RATE = 1e-4


def _vit_frozen(variant: vit.ViTVariant) -> tuple[str, ...]:
    """Patch embedding, tokens, position embeddings and the first half of the blocks."""
    half = variant.kwargs["depth"] // 2
    blocks = "|".join(str(i) for i in range(half))
    tokens = ("^cls_token$", "^pos_embed$")
    if variant.kwargs.get("num_registers"):
        tokens += ("^reg_token$",)
    return ("^patch_embed/", *tokens, f"^blocks/({blocks})/")


def _vit_spec(variant: vit.ViTVariant) -> BackboneSpec:
    timm_layout = variant.layout == "timm"
    return BackboneSpec(
        name=variant.name,
        make=lambda **kw: vit.make_vit(variant.name, **kw),
        preprocessing=_TIMM_VIT_STYLE if timm_layout else _DINOV2_STYLE,
        frozen=_vit_frozen(variant),
        weights=pretrained.HUB_WEIGHTS[variant.name],
        classifier_prefix="head.",
        num_classes=1000 if timm_layout else None,
        layout=variant.layout,
        learning_rate=VIT_LEARNING_RATE,
    )


BACKBONES.update({n: _vit_spec(v) for n, v in vit.VIT_VARIANTS.items() if n != "vit_tiny"})
BACKBONES["vit_tiny"] = BackboneSpec(
    name="vit_tiny",
    make=lambda **kw: vit.make_vit("vit_tiny", **kw),
    preprocessing=Preprocessing(
        resize=32, crop=None, method="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD
    ),
    frozen=_vit_frozen(vit.VIT_VARIANTS["vit_tiny"]),
    classifier_prefix="head.",
    num_classes=10,
    layout="timm",
)


def list_backbones() -> list[str]:
    """Names accepted by :func:`build_backbone`."""
    return sorted(BACKBONES)


def backbone_spec(name: str) -> BackboneSpec:
    """The registry entry of ``name``; unknown names list the valid ones."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(
            f"Unknown backbone {name!r}; choose one of {', '.join(list_backbones())}."
        ) from None


def build_backbone(name: str, **overrides: Any) -> nn.Module:
    """Builds the Flax module of backbone ``name``.

    Args:
      name: one of :func:`list_backbones`.
      **overrides: module attributes, e.g. ``dtype=jnp.bfloat16`` or ``num_classes=1000``.
    """
    return backbone_spec(name).make(**overrides)


def variable_shapes(model: nn.Module, image_size: int) -> dict[str, Any]:
    """Abstract ``{'params', 'batch_stats'}`` of ``model`` (``jax.ShapeDtypeStruct`` leaves)."""
    with_logits = getattr(model, "num_classes", None) is not None
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, with_logits=with_logits), images
    )


def _init_leaf(
    path: tuple[str, ...], shape: tuple[int, ...], rng: np.random.Generator
) -> np.ndarray:
    """Torchvision's initialisation of one variable, drawn with NumPy."""
    leaf = path[-1]
    if leaf == "kernel" and len(shape) == 4:  # kaiming_normal_(mode='fan_out', relu)
        fan_out = shape[0] * shape[1] * shape[3]
        return rng.normal(0.0, np.sqrt(2.0 / fan_out), shape)
    if leaf == "kernel" and len(shape) == 2:  # nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        bound = 1.0 / np.sqrt(shape[0])
        return rng.uniform(-bound, bound, shape)
    if leaf == "bias" and len(path) >= 2 and path[-2] in ("fc", "_fc"):
        return rng.uniform(-1.0, 1.0, shape) / np.sqrt(max(shape[0], 1))
    if leaf in ("pos_embed", "cls_token", "reg_token"):  # timm: trunc_normal_(std=0.02) or so
        return rng.normal(0.0, 0.02, shape)
    if leaf in ("scale", "var", "gamma"):  # gamma: Hugging Face DINOv2's layer scale init 1.0
        return np.ones(shape)
    return np.zeros(shape)  # BatchNorm bias and running mean


def init_variables(model: nn.Module, image_size: int, seed: int = 0) -> dict[str, Any]:
    """Randomly initialised ``{'params', 'batch_stats'}`` (float32 NumPy arrays).

    Args:
      model: a backbone from :func:`build_backbone` (with its classifier if it has ``num_classes``).
      image_size: side of the square input used to trace the model.
      seed: NumPy seed.
    """
    rng = np.random.default_rng(seed)
    flat = flax.traverse_util.flatten_dict(variable_shapes(model, image_size))
    return flax.traverse_util.unflatten_dict(
        {
            path: _init_leaf(path, tuple(leaf.shape), rng).astype(leaf.dtype)
            for path, leaf in flat.items()
        }
    )


def _has_classifier(state_dict: Mapping[str, Any], prefix: str) -> bool:
    return any(key.startswith(prefix) for key in state_dict)


def from_torchvision(
    state_dict: Mapping[str, np.ndarray], name: str, *, with_classifier: bool | None = None
) -> dict[str, Any]:
    """Converts a torch state dict of backbone ``name`` to ``{'params', 'batch_stats'}``.

    Args:
      state_dict: torch key -> array, e.g. from :func:`load_torch_checkpoint`.
      name: backbone name.
      with_classifier: keep the classifier; default: keep it when the state dict has one.

    Raises:
      StateDictMismatchError: listing every missing, unexpected or mis-shaped key.
    """
    spec = backbone_spec(name)
    if with_classifier is None:
        with_classifier = _has_classifier(state_dict, spec.classifier_prefix)
    if not with_classifier:
        state_dict = {
            k: v for k, v in state_dict.items() if not k.startswith(spec.classifier_prefix)
        }
    model = spec.make(num_classes=spec.num_classes if with_classifier else None)
    template = variable_shapes(model, spec.preprocessing.size)
    return convert.variables_from_torch(state_dict, template, model_name=name)


def convert_weights(
    state_dict: Mapping[str, np.ndarray], name: str, *, with_classifier: bool | None = None
) -> dict[str, Any]:
    """Converts a state dict in backbone ``name``'s weights layout (``BackboneSpec.layout``).

    Raises:
      StateDictMismatchError: listing every missing, unexpected or mis-shaped key.
      ValueError: a classifier was asked of weights that have none.
    """
    spec = backbone_spec(name)
    if spec.layout == "torchvision":
        return from_torchvision(state_dict, name, with_classifier=with_classifier)
    return convert_vit_weights(state_dict, name, spec.layout, with_classifier=with_classifier)


def convert_vit_weights(
    state_dict: Mapping[str, np.ndarray],
    name: str,
    layout: str,
    *,
    with_classifier: bool | None = None,
) -> dict[str, Any]:
    """Converts ViT backbone ``name``'s weights from any layout of ``vit_weights.LAYOUTS``.

    Args:
      state_dict: key -> array, e.g. from :func:`msad_jax.models.weight_files.load_state_dict`.
      name: a ViT backbone name.
      layout: ``'timm'``, ``'dinov2'``, ``'hf_vit'`` or ``'hf_dinov2'``.
      with_classifier: keep timm's ``head``; default: when the state dict has one.

    Raises:
      StateDictMismatchError: listing every missing, unexpected or mis-shaped key.
      ValueError: a classifier was asked of weights that have none.
    """
    spec = backbone_spec(name)
    has_head = _has_classifier(state_dict, spec.classifier_prefix) and layout == "timm"
    with_classifier = has_head if with_classifier is None else with_classifier
    if with_classifier and (spec.num_classes is None or layout != "timm"):
        raise ValueError(f"{name} weights in the {layout} layout have no classifier to load.")
    if not with_classifier and layout == "timm":
        state_dict = {
            k: v for k, v in state_dict.items() if not k.startswith(spec.classifier_prefix)
        }
    model = spec.make(num_classes=spec.num_classes if with_classifier else None)
    template = variable_shapes(model, spec.preprocessing.size)
    return vit_weights.convert_state_dict(state_dict, template, layout, model_name=name)


def to_torchvision(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Converts ``{'params', 'batch_stats'}`` back to a torch-layout state dict of NumPy arrays."""
    return convert.variables_to_torch(variables)


def _shapes_match(variables: Mapping[str, Any], template: Mapping[str, Any]) -> bool:
    got = flax.traverse_util.flatten_dict(variables)
    want = flax.traverse_util.flatten_dict(template)
    return got.keys() == want.keys() and all(np.shape(got[k]) == tuple(want[k].shape) for k in want)


def load_pretrained(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    *,
    with_classifier: bool = False,
    offline: bool | None = None,
    registry: Mapping[str, pretrained.WeightsFile] | None = None,
) -> dict[str, Any]:
    """Pretrained ``{'params', 'batch_stats'}`` of backbone ``name`` (NumPy arrays).

    Args:
      name: backbone name.
      cache_dir: cache folder; default ``$MSAD_JAX_CACHE`` or ``~/.cache/msad_jax``.
      with_classifier: also load the ImageNet classifier (build the model with ``num_classes``).
      offline: never use the network (default: ``MSAD_JAX_OFFLINE``).
      registry: replaces the built-in name -> weights file table (tests, private weights).

    Raises:
      PretrainedWeightsError: weights missing offline, download failure or hash mismatch.
      StateDictMismatchError: the file does not fit the architecture.
    """
    spec = backbone_spec(name)
    weights = (registry or {}).get(name, spec.weights)
    if weights is None:
        raise pretrained.PretrainedWeightsError(
            f"Backbone {name!r} has no pretrained weights; use a ResNet, EfficientNet-Lite, ViT "
            "or DINOv2."
        )
    path = pretrained.fetch_weights(name, weights, cache_dir, offline=offline)
    kind = "classifier" if with_classifier else "features"
    converted = pretrained.default_cache_dir(cache_dir) / f"{pathlib.Path(path).stem}.{kind}.npz"
    model = spec.make(num_classes=spec.num_classes if with_classifier else None)
    template = variable_shapes(model, spec.preprocessing.size)
    if converted.is_file():
        try:
            variables = pretrained.load_variables(converted)
            if _shapes_match(variables, template):
                return variables
        except (ValueError, OSError):
            pass  # A damaged conversion cache is rebuilt from the verified weights file below.
    state_dict = weight_files.load_state_dict(path)
    variables = convert_weights(state_dict, name, with_classifier=with_classifier)
    with contextlib.suppress(OSError):  # A read-only cache only costs a re-conversion next time.
        pretrained.save_variables(variables, converted)
    return variables
