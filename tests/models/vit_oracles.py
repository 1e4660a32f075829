"""Test helpers: timm / transformers oracles on random weights, and their Flax twins."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import torch

from msad_jax.models import vit, vit_weights


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replaces every parameter by random values (norm scales and layer scales around 1).

    Default initialisations leave biases at 0 and scales at 1, which would hide swapped or
    dropped parameters; random values make every parameter count.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            scale_like = param.ndim == 1 and (
                ("norm" in name and name.endswith("weight")) or "lambda" in name or "gamma" in name
            )
            if scale_like:
                param.copy_(1.0 + 0.3 * noise)
            elif param.ndim >= 2:
                param.copy_(noise / np.sqrt(param[0].numel()))
            else:
                param.copy_(0.3 * noise)
    return model.eval()


def file_layout(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Parameters (or their gradients) named as in the model's files on the Hub.

    transformers >= 5 renames some modules internally (``attention.q_proj``); its
    ``save_pretrained`` writes the original names, which ``revert_weight_conversion`` gives
    (older versions use the original names throughout). timm models are returned as they are.
    """
    if hasattr(model, "config") and hasattr(model, "save_pretrained"):
        try:
            from transformers.core_model_loading import revert_weight_conversion
        except ImportError:  # transformers < 5
            pass
        else:
            tensors = revert_weight_conversion(model, dict(tensors))
    return {
        k: v.detach().cpu().numpy() if v.device.type != "meta" else v for k, v in tensors.items()
    }


@dataclasses.dataclass
class Pair:
    """A torch oracle, its Flax twin, and how to get the oracle's features."""

    torch_model: torch.nn.Module
    flax_model: vit.VisionTransformer
    layout: str
    features: Callable[[torch.Tensor], torch.Tensor]

    def variables(self) -> dict[str, Any]:
        state = file_layout(self.torch_model, self.torch_model.state_dict())
        return vit_weights.convert_state_dict(state, self.template(), self.layout)

    def template(self) -> dict[str, Any]:
        image = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
        head = self.flax_model.num_classes is not None
        return jax.eval_shape(
            lambda x: self.flax_model.init(jax.random.key(0), x, with_logits=head), image
        )


def timm_pair(
    *,
    patch: int,
    dim: int,
    depth: int,
    heads: int,
    image: int,
    registers: int = 0,
    layer_scale: bool = False,
    no_embed_class: bool = False,
    num_classes: int = 0,
    seed: int = 0,
) -> Pair:
    import timm.models.vision_transformer as tv

    model = tv.VisionTransformer(
        img_size=image,
        patch_size=patch,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        init_values=1e-5 if layer_scale else None,
        reg_tokens=registers,
        no_embed_class=no_embed_class,
        num_classes=num_classes,
        dynamic_img_size=True,
    )
    randomize_(model, seed)
    flax_model = vit.VisionTransformer(
        patch_size=patch,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        pos_grid=image // patch,
        num_registers=registers,
        layer_scale=layer_scale,
        class_pos_embed=not no_embed_class,
        antialias=True,
        num_classes=num_classes or None,
    )

    def features(x: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.forward_features(x), pre_logits=True)

    return Pair(model, flax_model, "timm", features)


def hf_pair(
    kind: str,
    *,
    patch: int,
    dim: int,
    depth: int,
    heads: int,
    image: int,
    registers: int = 0,
    pooling: str = "cls",
    seed: int = 0,
) -> Pair:
    """``kind``: 'dinov2' (Dinov2Model or, with registers, Dinov2WithRegistersModel) or 'vit'."""
    import transformers

    size = {"hidden_size": dim, "num_hidden_layers": depth, "num_attention_heads": heads}
    size |= {"patch_size": patch, "image_size": image}
    if kind == "vit":
        config = transformers.ViTConfig(**size, intermediate_size=4 * dim)
        model = transformers.ViTModel(config, add_pooling_layer=False)
        extra = {"layer_norm_eps": config.layer_norm_eps, "antialias": False}
        call = {"interpolate_pos_encoding": True}
    elif registers:
        config = transformers.Dinov2WithRegistersConfig(**size, num_register_tokens=registers)
        model = transformers.Dinov2WithRegistersModel(config)
        extra = {"layer_scale": True, "antialias": True, "num_registers": registers}
        call = {}
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**size))
        extra = {"layer_scale": True, "antialias": False}
        call = {}
    randomize_(model, seed)
    flax_model = vit.VisionTransformer(
        patch_size=patch,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        pos_grid=image // patch,
        pooling=pooling,
        **extra,
    )

    def features(x: torch.Tensor) -> torch.Tensor:
        hidden = model(pixel_values=x, **call).last_hidden_state
        if pooling == "cls":
            return hidden[:, 0]
        return torch.cat([hidden[:, 0], hidden[:, 1 + registers :].mean(1)], dim=1)

    return Pair(model, flax_model, "hf_vit" if kind == "vit" else "hf_dinov2", features)


def max_relative_error(got: Any, want: Any) -> float:
    """``max |got - want| / max |want|`` (the error relative to the tensor's scale)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def compare(
    pair: Pair, size: int, batch: int, *, seed: int = 0, quick_compile: bool = False
) -> dict[str, float]:
    """Worst relative errors of features, input gradients and parameter gradients.

    The gradients are those of ``sum(features * r)`` for a fixed random ``r``. ``quick_compile``
    compiles with XLA's backend optimisation level 0 (the same operations, a third of the
    compile time of a 12-block ViT on a CPU).
    """
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    pair.torch_model.zero_grad(set_to_none=True)
    want = pair.features(x)
    weights = rng.standard_normal(tuple(want.shape)).astype(np.float32)
    (want * torch.from_numpy(weights)).sum().backward()
    grads = {k: p.grad for k, p in pair.torch_model.named_parameters() if p.grad is not None}
    want_params = vit_weights.convert_state_dict(
        file_layout(pair.torch_model, grads), pair.template(), pair.layout
    )
    variables = pair.variables()

    def loss(params: Any, images: jax.Array) -> jax.Array:
        out = pair.flax_model.apply({"params": params}, images)
        return jnp.sum(out * weights), out

    step = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))
    args = (variables["params"], jnp.asarray(images))
    if quick_compile:
        options = {"xla_backend_optimization_level": 0}
        step = step.lower(*args).compile(compiler_options=options)
    (_, got), (got_params, got_x) = step(*args)
    errors = {
        "features": max_relative_error(got, want.detach().numpy()),
        "input_grad": max_relative_error(got_x, x.grad.numpy().transpose(0, 2, 3, 1)),
    }
    flat_got = flax.traverse_util.flatten_dict(got_params, sep="/")
    flat_want = flax.traverse_util.flatten_dict(want_params["params"], sep="/")
    assert flat_got.keys() == flat_want.keys()
    errors["param_grads"] = max(max_relative_error(flat_got[k], flat_want[k]) for k in flat_want)
    return errors
