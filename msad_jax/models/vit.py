"""Vision Transformers in Flax: ViT (timm layout) and DINOv2 (layer scale, register tokens)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Pooling = Literal["cls", "cls_mean"]


# --------------------------------------------------------------------------------------------
# Position-embedding resampling (torch.nn.functional.interpolate, bicubic, align_corners=False).


def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel at distances ``x``."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x <= 1.0, near, np.where(x < 2.0, far, 0.0))


def _plain_bicubic(in_size: int, out_size: int, scale: float) -> np.ndarray:
    """torch's ``upsample_bicubic2d`` along one axis: 4 taps, ``a = -0.75``, clamped borders."""
    weights = np.zeros((out_size, in_size))
    for i in range(out_size):
        source = scale * (i + 0.5) - 0.5
        start = int(np.floor(source))
        t = source - start
        taps = _keys_cubic(np.array([t + 1.0, t, 1.0 - t, 2.0 - t]), -0.75)
        for k, w in enumerate(taps):
            weights[i, min(max(start - 1 + k, 0), in_size - 1)] += w
    return weights


def _antialiased_bicubic(in_size: int, out_size: int, scale: float) -> np.ndarray:
    """torch's ``_upsample_bicubic2d_aa`` along one axis: PIL-style support, ``a = -0.5``."""
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    weights = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = _keys_cubic((np.arange(lo, hi) - center + 0.5) * inv_scale, -0.5)
        total = taps.sum()
        weights[i, lo:hi] = taps / total if total != 0.0 else taps
    return weights


@functools.lru_cache(maxsize=64)
def resample_matrix(
    in_size: int, out_size: int, *, antialias: bool, offset: float = 0.0
) -> np.ndarray:
    """The ``[out_size, in_size]`` matrix of torch's 1-D bicubic resampling (float64).

    Args:
      in_size: length of the input axis.
      out_size: length of the output axis.
      antialias: torch's ``antialias`` flag.
      offset: the original DINOv2 code's ``interpolate_offset`` (0: resample by size).
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resample_matrix needs positive sizes, got {in_size} -> {out_size}.")
    if antialias and offset:
        raise ValueError("interpolation_offset applies to plain bicubic only (antialias=False).")
    scale = in_size / (out_size + offset)  # torch: 1 / scale_factor, else in / out
    if antialias:
        return _antialiased_bicubic(in_size, out_size, scale)
    return _plain_bicubic(in_size, out_size, scale)


def resample_grid(
    grid: jax.Array, out_hw: tuple[int, int], *, antialias: bool, offset: float = 0.0
) -> jax.Array:
    """Resamples a ``[H, W, D]`` grid to ``out_hw`` like torch's bicubic interpolate (float32)."""
    h, w = grid.shape[:2]
    if (h, w) == tuple(out_hw):
        return grid
    rows = jnp.asarray(resample_matrix(h, out_hw[0], antialias=antialias, offset=offset))
    cols = jnp.asarray(resample_matrix(w, out_hw[1], antialias=antialias, offset=offset))
    grid = grid.astype(jnp.float32)
    precision = jax.lax.Precision.HIGHEST
    grid = jnp.einsum("ah,hwd->awd", rows.astype(jnp.float32), grid, precision=precision)
    return jnp.einsum("bw,awd->abd", cols.astype(jnp.float32), grid, precision=precision)


# --------------------------------------------------------------------------------------------
# Layers.


def _dense(features: int, name: str, dtype: Dtype) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name)


def _layer_norm(eps: float, name: str, dtype: Dtype) -> nn.LayerNorm:
    """torch's LayerNorm: two-pass variance, statistics in float32."""
    return nn.LayerNorm(
        epsilon=eps, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False, name=name
    )


class PatchProjection(nn.Module):
    """timm's ``patch_embed.proj``: a stride-``p`` ``p x p`` convolution as one matrix product."""

    patch_size: int
    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``[N, H, W, C]`` images -> ``[N, H // p, W // p, D]`` patch embeddings."""
        p = self.patch_size
        n, h, w, c = x.shape
        gh, gw = h // p, w // p
        fan_in = p * p * c
        kernel = self.param(
            "kernel",
            nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
            (p, p, c, self.features),
            jnp.float32,
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        patches = x[:, : gh * p, : gw * p].reshape(n, gh, p, gw, p, c)
        patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(n, gh, gw, fan_in)
        out = jnp.dot(patches.astype(self.dtype), kernel.reshape(fan_in, -1).astype(self.dtype))
        return out + bias.astype(self.dtype)


class PatchEmbed(nn.Module):
    """timm's ``patch_embed``: holds the projection ``proj``."""

    patch_size: int
    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``[N, H, W, C]`` images -> ``[N, H // p, W // p, D]`` patch embeddings."""
        return PatchProjection(self.patch_size, self.features, self.dtype, name="proj")(x)


class LayerScale(nn.Module):
    """DINOv2's per-channel scale ``gamma`` (timm ``ls1.gamma``, Hugging Face ``lambda1``)."""

    init_value: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Scales the channels of ``x``."""
        gamma = self.param(
            "gamma", nn.initializers.constant(self.init_value), (x.shape[-1],), jnp.float32
        )
        return x * gamma.astype(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection and an output ``proj``."""

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``[N, T, D]`` -> ``[N, T, D]``."""
        n, t, d = x.shape
        qkv = _dense(3 * d, "qkv", self.dtype)(x)
        q, k, v = jnp.split(qkv.reshape(n, t, 3, self.num_heads, d // self.num_heads), 3, axis=2)
        out = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0])
        return _dense(d, "proj", self.dtype)(out.reshape(n, t, d))


class Mlp(nn.Module):
    """``fc1`` -> exact GELU -> ``fc2``."""

    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the two layers."""
        y = nn.gelu(_dense(self.hidden, "fc1", self.dtype)(x), approximate=False)
        return _dense(x.shape[-1], "fc2", self.dtype)(y)


class Block(nn.Module):
    """A pre-norm transformer block (timm ``Block``), optionally with layer scale."""

    num_heads: int
    mlp_ratio: float
    layer_scale: bool
    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Updates the float32 residual stream ``x`` ``[N, T, D]``."""
        d = x.shape[-1]
        y = Attention(self.num_heads, self.dtype, name="attn")(
            _layer_norm(self.eps, "norm1", self.dtype)(x)
        )
        if self.layer_scale:
            y = LayerScale(name="ls1")(y)
        x = x + y.astype(x.dtype)
        y = Mlp(int(d * self.mlp_ratio), self.dtype, name="mlp")(
            _layer_norm(self.eps, "norm2", self.dtype)(x)
        )
        if self.layer_scale:
            y = LayerScale(name="ls2")(y)
        return x + y.astype(x.dtype)


class Blocks(nn.Module):
    """timm's ``blocks``: :class:`Block` modules named ``'0'``, ``'1'``, ..."""

    depth: int
    num_heads: int
    mlp_ratio: float
    layer_scale: bool
    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the blocks in order."""
        for i in range(self.depth):
            x = Block(
                self.num_heads, self.mlp_ratio, self.layer_scale, self.eps, self.dtype, name=str(i)
            )(x)
        return x


class VisionTransformer(nn.Module):
    """A pre-norm ViT / DINOv2 backbone returning the final normed CLS token.

    Attributes:
      patch_size: side of the square patches.
      embed_dim: token width ``D``.
      depth: number of blocks.
      num_heads: attention heads.
      mlp_ratio: MLP hidden width over ``D``.
      pos_grid: side of the stored position-embedding grid (native image size / patch size).
      num_registers: DINOv2 register tokens (0 = none).
      layer_scale: per-channel layer scale after attention and MLP (DINOv2).
      layer_norm_eps: LayerNorm epsilon (1e-6 in timm and DINOv2; 1e-12 in Hugging Face ViT).
      class_pos_embed: the position embeddings include an entry for the CLS token (False: timm's
        ``no_embed_class``, where only patches get position embeddings).
      antialias: resample position embeddings with torch's antialiased bicubic.
      interpolation_offset: the original DINOv2 code's ``interpolate_offset`` (0: by size).
      pooling: ``'cls'`` (features ``[N, D]``) or ``'cls_mean'`` (``[N, 2D]``).
      num_classes: size of timm's ``head`` classifier on the CLS token, or None.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
    """

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    pos_grid: int = 14
    num_registers: int = 0
    layer_scale: bool = False
    layer_norm_eps: float = 1e-6
    class_pos_embed: bool = True
    antialias: bool = True
    interpolation_offset: float = 0.0
    pooling: Pooling = "cls"
    num_classes: int | None = None
    dtype: Dtype = jnp.float32

    @property
    def feature_dim(self) -> int:
        """Dimension of the features."""
        return self.embed_dim * (2 if self.pooling == "cls_mean" else 1)

    def _check(self, x: jax.Array, with_logits: bool) -> None:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(
                f"VisionTransformer expects NHWC images with 3 channels, got shape "
                f"{tuple(x.shape)}; convert grayscale/RGBA to RGB and put channels last."
            )
        if min(x.shape[1:3]) < self.patch_size:
            raise ValueError(
                f"Images of {x.shape[1]}x{x.shape[2]} px are smaller than one "
                f"{self.patch_size}x{self.patch_size} patch; resize them first."
            )
        if self.pooling not in ("cls", "cls_mean"):
            raise ValueError(f"pooling={self.pooling!r}: use 'cls' or 'cls_mean'.")
        if with_logits and self.num_classes is None:
            raise ValueError(
                "with_logits=True needs a classifier: build the model with num_classes."
            )

    def _position_embeddings(self, grid_hw: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
        """``(cls_pos [1, D] or zeros, patch_pos [gh * gw, D])`` in float32."""
        d, g = self.embed_dim, self.pos_grid
        prefix = 1 if self.class_pos_embed else 0
        pos = self.param(
            "pos_embed",
            nn.initializers.truncated_normal(0.02),
            (1, prefix + g * g, d),
            jnp.float32,
        )
        cls_pos = pos[0, :1] if prefix else jnp.zeros((1, d), jnp.float32)
        patch_pos = resample_grid(
            pos[0, prefix:].reshape(g, g, d),
            grid_hw,
            antialias=self.antialias,
            offset=self.interpolation_offset,
        )
        return cls_pos, patch_pos.reshape(-1, d)

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, *, with_logits: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Computes the features (and logits) of NHWC images.

        Args:
          x: normalised images ``[N, H, W, 3]``; ``H`` and ``W`` need not be ``pos_grid * p``.
          train: unused (no dropout, no BatchNorm).
          with_logits: also return the classifier's logits (needs ``num_classes``).

        Returns:
          Features ``[N, feature_dim]`` in float32, or ``(features, logits)``.
        """
        del train
        self._check(x, with_logits)
        n, d = x.shape[0], self.embed_dim
        patches = PatchEmbed(self.patch_size, d, self.dtype, name="patch_embed")(x)
        gh, gw = patches.shape[1:3]
        cls_pos, patch_pos = self._position_embeddings((gh, gw))
        cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, d), jnp.float32)
        tokens = [jnp.broadcast_to(cls + cls_pos, (n, 1, d))]
        if self.num_registers:
            reg = self.param(
                "reg_token", nn.initializers.normal(1e-6), (1, self.num_registers, d), jnp.float32
            )
            tokens.append(jnp.broadcast_to(reg, (n, self.num_registers, d)))
        tokens.append(patches.reshape(n, gh * gw, d).astype(jnp.float32) + patch_pos)
        h = jnp.concatenate(tokens, axis=1)
        h = Blocks(
            self.depth,
            self.num_heads,
            self.mlp_ratio,
            self.layer_scale,
            self.layer_norm_eps,
            self.dtype,
            name="blocks",
        )(h)
        h = _layer_norm(self.layer_norm_eps, "norm", self.dtype)(h).astype(jnp.float32)
        cls_out = h[:, 0]
        features = cls_out
        if self.pooling == "cls_mean":
            mean_patch = jnp.mean(h[:, 1 + self.num_registers :], axis=1)
            features = jnp.concatenate([cls_out, mean_patch], axis=-1)
        if not with_logits:
            return features
        logits = _dense(self.num_classes, "head", self.dtype)(cls_out)
        return features, logits.astype(jnp.float32)


# --------------------------------------------------------------------------------------------
# Named variants.


@dataclasses.dataclass(frozen=True)
class ViTVariant:
    """Architecture of one named ViT and the layout of its published weights.

    Attributes:
      name: registry name.
      kwargs: :class:`VisionTransformer` attributes.
      native_size: image side the position embeddings were trained for (``pos_grid * patch``).
      layout: layout of the published weights (:data:`msad_jax.models.vit_weights.LAYOUTS`).
    """

    name: str
    kwargs: dict[str, Any]
    layout: str

    @property
    def native_size(self) -> int:
        """Image side of the stored position-embedding grid."""
        return self.kwargs["pos_grid"] * self.kwargs["patch_size"]


def _dinov2(dim: int, depth: int, heads: int, registers: int) -> dict[str, Any]:
    return {
        "patch_size": 14,
        "embed_dim": dim,
        "depth": depth,
        "num_heads": heads,
        "pos_grid": 37,
        "layer_scale": True,
        "num_registers": registers,
        # Hugging Face's Dinov2Model resamples without antialiasing, Dinov2WithRegistersModel with.
        "antialias": registers > 0,
    }


VIT_VARIANTS: dict[str, ViTVariant] = {
    v.name: v
    for v in (
        ViTVariant(
            "vit_small_patch16_224",
            {"patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6, "pos_grid": 14},
            "timm",
        ),
        ViTVariant(
            "vit_base_patch16_224",
            {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12, "pos_grid": 14},
            "timm",
        ),
        *(
            ViTVariant(f"dinov2_vit{s}14{suffix}", _dinov2(d, n, h, r), "hf_dinov2")
            for s, d, n, h in (("s", 384, 12, 6), ("b", 768, 12, 12), ("l", 1024, 24, 16))
            for suffix, r in (("", 0), ("_reg", 4))
        ),
        # For tests and smoke runs: 32 px images, 4 px patches.
        ViTVariant(
            "vit_tiny",
            {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "pos_grid": 8},
            "timm",
        ),
    )
}


def make_vit(name: str, **overrides: Any) -> VisionTransformer:
    """Builds a named variant (see :data:`VIT_VARIANTS`), overriding module attributes."""
    if name not in VIT_VARIANTS:
        raise ValueError(f"Unknown ViT {name!r}; choose one of {sorted(VIT_VARIANTS)}.")
    return VisionTransformer(**{**VIT_VARIANTS[name].kwargs, **overrides})
