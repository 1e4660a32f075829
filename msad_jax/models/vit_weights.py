"""Strict conversion of ViT / DINOv2 weights (timm, Hugging Face, original DINOv2) to Flax.

Layouts: ``'timm'`` (timm's keys, optional ``head``), ``'dinov2'`` (the original checkpoints:
``register_tokens``, unused ``mask_token``), ``'hf_dinov2'`` and ``'hf_vit'`` (Hugging Face;
separate query/key/value projections are fused into ``qkv``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import flax
import numpy as np

from msad_jax.models import convert

LAYOUTS = ("timm", "dinov2", "hf_vit", "hf_dinov2")

# Keys a source may carry that the backbone does not use (accepted, never required).
_UNUSED: dict[str, tuple[str, ...]] = {
    "timm": (),
    "dinov2": ("mask_token",),
    "hf_vit": ("pooler.dense.weight", "pooler.dense.bias"),
    "hf_dinov2": ("embeddings.mask_token",),
}

_LEAF_SUFFIX = {"kernel": "weight", "scale": "weight", "bias": "bias"}

# timm key -> Hugging Face key(s); '{h}' is filled with the family's block names below.
_HF_RULES: tuple[tuple[str, str], ...] = (
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embeddings.projection.\1"),
    (r"cls_token", "embeddings.cls_token"),
    (r"pos_embed", "embeddings.position_embeddings"),
    (r"reg_token", "embeddings.register_tokens"),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", r"encoder.layer.\1.{norm1}.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layer.\1.attention.output.dense.\2"),
    (r"blocks\.(\d+)\.ls1\.gamma", r"encoder.layer.\1.layer_scale1.lambda1"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"encoder.layer.\1.{norm2}.\2"),
    (r"blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", r"encoder.layer.\1.{fc1}.\2"),
    (r"blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", r"encoder.layer.\1.{fc2}.\2"),
    (r"blocks\.(\d+)\.ls2\.gamma", r"encoder.layer.\1.layer_scale2.lambda1"),
    (r"norm\.(weight|bias)", r"layernorm.\1"),
)
_HF_QKV = re.compile(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)")
_HF_NAMES = {
    "hf_dinov2": {"norm1": "norm1", "norm2": "norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2"},
    "hf_vit": {
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "fc1": "intermediate.dense",
        "fc2": "output.dense",
    },
}


def timm_key(path: tuple[str, ...]) -> str:
    """timm's state-dict key of a Flax parameter path ``('params', *modules, leaf)``."""
    _, *modules, leaf = path
    return ".".join([*modules, _LEAF_SUFFIX.get(leaf, leaf)])


def _hf_keys(key: str, layout: str) -> tuple[str, ...]:
    qkv = _HF_QKV.fullmatch(key)
    if qkv:
        block, leaf = qkv.groups()
        base = f"encoder.layer.{block}.attention.attention"
        return tuple(f"{base}.{part}.{leaf}" for part in ("query", "key", "value"))
    for pattern, replacement in _HF_RULES:
        if re.fullmatch(pattern, key):
            return (re.sub(pattern, replacement, key).format(**_HF_NAMES[layout]),)
    raise ValueError(f"The {layout} layout has no equivalent of {key}.")


def source_keys(path: tuple[str, ...], layout: str) -> tuple[str, ...]:
    """The key(s) holding a Flax parameter in ``layout`` (several are stacked along axis 0)."""
    key = timm_key(path)
    if layout == "timm":
        return (key,)
    if layout == "dinov2":
        return ("register_tokens",) if key == "reg_token" else (key,)
    if layout in _HF_NAMES:
        return _hf_keys(key, layout)
    raise ValueError(f"Unknown weights layout {layout!r}; choose one of {', '.join(LAYOUTS)}.")


def _torch_shape(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
    if leaf == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return shape


def _from_torch(array: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 4:
        return np.transpose(array, (2, 3, 1, 0))
    if leaf == "kernel" and array.ndim == 2:
        return np.transpose(array, (1, 0))
    return array


def _flat_params(template: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(dict(template)))
    extra = sorted({path[0] for path in flat} - {"params"})
    if extra:
        raise ValueError(f"A ViT has only 'params', got collections {extra}.")
    return flat


def expected_shapes(template: Mapping[str, Any], layout: str) -> dict[str, tuple[int, ...]]:
    """Source key -> shape that ``layout`` must hold for Flax variables shaped like ``template``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path, leaf in _flat_params(template).items():
        keys = source_keys(path, layout)
        shape = _torch_shape(tuple(leaf.shape), path[-1])
        part = (shape[0] // len(keys), *shape[1:])
        shapes.update({key: part for key in keys})
    return shapes


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    template: Mapping[str, Any],
    layout: str,
    *,
    model_name: str = "the model",
) -> dict[str, Any]:
    """Converts a ``layout`` state dict into Flax variables shaped like ``template``.

    Args:
      state_dict: key -> array in the source's (torch) layout.
      template: ``{'params': ...}`` of arrays or ``jax.ShapeDtypeStruct`` (names, shapes, dtypes).
      layout: one of :data:`LAYOUTS`.
      model_name: used in error messages.

    Returns:
      ``{'params': ...}`` as nested dicts of NumPy arrays of the template's dtypes.

    Raises:
      StateDictMismatchError: listing every missing, unexpected and mis-shaped key.
    """
    expected = expected_shapes(template, layout)
    used = {k: v for k, v in state_dict.items() if k not in _UNUSED[layout]}
    convert.check_state_dict_keys(expected, used, model_name=f"{model_name} ({layout} layout)")
    flat = {}
    for path, leaf in _flat_params(template).items():
        parts = [np.asarray(state_dict[key]) for key in source_keys(path, layout)]
        array = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        flat[path] = np.ascontiguousarray(_from_torch(array, path[-1])).astype(leaf.dtype)
    return flax.traverse_util.unflatten_dict(flat)
