"""Backbones in Flax (ResNet, EfficientNet-Lite, ViT, DINOv2); pretrained weights without torch."""

from msad_jax.models.convert import StateDictMismatchError, check_state_dict_keys
from msad_jax.models.pretrained import PretrainedWeightsError, WeightsFile, default_cache_dir
from msad_jax.models.registry import (
    BackboneSpec,
    backbone_spec,
    build_backbone,
    convert_weights,
    from_torchvision,
    init_variables,
    list_backbones,
    load_pretrained,
    to_torchvision,
    variable_shapes,
)
from msad_jax.models.resnet import ResNet
from msad_jax.models.vit import VisionTransformer
from msad_jax.models.weight_files import (
    UnsafeCheckpointError,
    load_safetensors,
    load_state_dict,
    load_torch_checkpoint,
)

__all__ = [
    "BackboneSpec",
    "PretrainedWeightsError",
    "ResNet",
    "StateDictMismatchError",
    "UnsafeCheckpointError",
    "VisionTransformer",
    "WeightsFile",
    "backbone_spec",
    "build_backbone",
    "check_state_dict_keys",
    "convert_weights",
    "default_cache_dir",
    "from_torchvision",
    "init_variables",
    "list_backbones",
    "load_pretrained",
    "load_safetensors",
    "load_state_dict",
    "load_torch_checkpoint",
    "to_torchvision",
    "variable_shapes",
]
