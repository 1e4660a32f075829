"""The PyTorch side of the ViT benchmarks: torchvision's ``VisionTransformer`` at the same size.

torchvision ships a pre-norm ViT (fused-projection attention, exact GELU, LayerNorm eps 1e-6,
CLS-token features) in every PyTorch install, so the GPU benchmark needs no timm or transformers
there. It is built with the patch size, width, depth, heads and MLP width of the msad_jax
variant; it has no layer scale and no register tokens (DINOv2's per-channel scales and 4 extra
tokens are a negligible share of the work) and its position embeddings are stored at the
benchmark's image size (msad_jax resamples DINOv2's 37 x 37 grid, a small matrix product).
Random weights under a fixed seed: these benchmarks measure speed, not features.
"""

from __future__ import annotations

import torch
import torchvision

from msad_jax.models import vit


def torch_vit(name: str, image_size: int = 224, seed: int = 0) -> torch.nn.Module:
    """torchvision ``VisionTransformer`` shaped like msad_jax's ``name``, head removed.

    The parameters msad_jax freezes by default (patch embedding, CLS token, position embeddings,
    the first half of the blocks) get ``requires_grad=False``.
    """
    kw = vit.VIT_VARIANTS[name].kwargs
    torch.manual_seed(seed)
    model = torchvision.models.VisionTransformer(
        image_size=image_size,
        patch_size=kw["patch_size"],
        num_layers=kw["depth"],
        num_heads=kw["num_heads"],
        hidden_dim=kw["embed_dim"],
        mlp_dim=int(kw["embed_dim"] * kw.get("mlp_ratio", 4.0)),
    )
    model.heads = torch.nn.Identity()
    frozen = ("conv_proj.", "class_token", "encoder.pos_embedding") + tuple(
        f"encoder.layers.encoder_layer_{i}." for i in range(kw["depth"] // 2)
    )
    for key, param in model.named_parameters():
        if key.startswith(frozen):
            param.requires_grad_(False)
    return model.eval()
