"""ResNets in Flax with torchvision's exact topology and parameter names.

The modules reproduce ``torchvision.models.resnet`` (ResNet v1.5) operation for operation, so that
torchvision ImageNet weights convert one-to-one:

* stem: 7x7/2 convolution with symmetric padding 3, BatchNorm, ReLU, 3x3/2 max-pool with padding 1
  (padded with -inf, so padding never wins the max);
* ``BasicBlock`` (ResNet-18/34) and ``Bottleneck`` (ResNet-50/101/152) with the stride on the 3x3
  convolution (v1.5) and a 1x1 convolution + BatchNorm shortcut wherever the shape changes;
* explicit symmetric padding everywhere (TF-style ``'SAME'`` padding differs at stride 2);
* BatchNorm with epsilon 1e-5 and torch's momentum 0.1 (Flax momentum 0.9).

Submodule names follow torchvision's state-dict keys: the parameters of ``layer1.0.conv1.weight``
live at ``params['layer1']['0']['conv1']['kernel']`` and its running mean of ``layer1.0.bn1`` at
``batch_stats['layer1']['0']['bn1']['mean']``.

The module returns the global-average-pooled features of the last stage, ``[N, D]`` in float32.
With ``num_classes`` set it also owns torchvision's ``fc`` layer; ``with_logits=True`` then returns
``(features, logits)`` (used for parity checks against torchvision).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from msad_jax.models import cpu_lowering

Dtype = Any

# torchvision's kaiming_normal_(mode='fan_out', nonlinearity='relu').
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(
    features: int,
    kernel: int,
    stride: int,
    padding: int,
    name: str,
    dtype: Dtype,
) -> nn.Conv:
    """A bias-free convolution with explicit symmetric padding, as torch's ``nn.Conv2d``."""
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        use_bias=False,
        kernel_init=_CONV_INIT,
        dtype=dtype,
        param_dtype=jnp.float32,
        conv_general_dilated=cpu_lowering.conv_general_dilated,
        name=name,
    )


def _batch_norm(train: bool, name: str, dtype: Dtype) -> nn.BatchNorm:
    """BatchNorm matching torch's defaults (eps 1e-5, momentum 0.1)."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


class Downsample(nn.Module):
    """The shortcut projection ``downsample.0`` (1x1 conv) and ``downsample.1`` (BatchNorm)."""

    features: int
    stride: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        """Projects ``x`` to the block's output shape."""
        x = _conv(self.features, 1, self.stride, 0, "0", self.dtype)(x)
        return _batch_norm(train, "1", self.dtype)(x)


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: two 3x3 convolutions (ResNet-18/34)."""

    planes: int
    stride: int = 1
    dtype: Dtype = jnp.float32

    expansion = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        """Applies the block."""
        out_features = self.planes * self.expansion
        y = _conv(self.planes, 3, self.stride, 1, "conv1", self.dtype)(x)
        y = nn.relu(_batch_norm(train, "bn1", self.dtype)(y))
        y = _conv(self.planes, 3, 1, 1, "conv2", self.dtype)(y)
        y = _batch_norm(train, "bn2", self.dtype)(y)
        if self.stride != 1 or x.shape[-1] != out_features:
            x = Downsample(out_features, self.stride, self.dtype, name="downsample")(x, train)
        return nn.relu(y + x)


class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (v1.5: the stride sits on the 3x3 convolution)."""

    planes: int
    stride: int = 1
    dtype: Dtype = jnp.float32

    expansion = 4

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        """Applies the block."""
        out_features = self.planes * self.expansion
        y = _conv(self.planes, 1, 1, 0, "conv1", self.dtype)(x)
        y = nn.relu(_batch_norm(train, "bn1", self.dtype)(y))
        y = _conv(self.planes, 3, self.stride, 1, "conv2", self.dtype)(y)
        y = nn.relu(_batch_norm(train, "bn2", self.dtype)(y))
        y = _conv(out_features, 1, 1, 0, "conv3", self.dtype)(y)
        y = _batch_norm(train, "bn3", self.dtype)(y)
        if self.stride != 1 or x.shape[-1] != out_features:
            x = Downsample(out_features, self.stride, self.dtype, name="downsample")(x, train)
        return nn.relu(y + x)


class Stage(nn.Module):
    """One of torchvision's ``layer1``..``layer4``: blocks named ``'0'``, ``'1'``, ..."""

    block: type[BasicBlock] | type[Bottleneck]
    num_blocks: int
    planes: int
    stride: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        """Applies the blocks in order; only the first one strides."""
        for i in range(self.num_blocks):
            stride = self.stride if i == 0 else 1
            x = self.block(self.planes, stride, self.dtype, name=str(i))(x, train)
        return x


class ResNet(nn.Module):
    """A torchvision-compatible ResNet returning pooled features.

    Attributes:
      stage_sizes: number of blocks in ``layer1``..``layer4``.
      block: ``BasicBlock`` or ``Bottleneck``.
      width: channels of the stem and of ``layer1`` (64 in torchvision; smaller for tests).
      num_classes: size of the ``fc`` classifier, or None for no classifier.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
    """

    stage_sizes: Sequence[int]
    block: type[BasicBlock] | type[Bottleneck]
    width: int = 64
    num_classes: int | None = None
    dtype: Dtype = jnp.float32

    @property
    def feature_dim(self) -> int:
        """Dimension of the pooled features."""
        return self.width * 8 * self.block.expansion

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, train: bool = False, *, with_logits: bool = False
    ) -> jnp.ndarray | tuple[jnp.ndarray, jnp.ndarray]:
        """Computes pooled features (and logits) of NHWC images.

        Args:
          x: normalised images, ``[N, H, W, 3]``.
          train: BatchNorm uses batch statistics and updates ``batch_stats`` when True; when False
            (the fine-tuning default) it uses the stored running statistics.
          with_logits: also return the classifier's logits (needs ``num_classes``).

        Returns:
          Features ``[N, D]`` in float32, or ``(features, logits)``.
        """
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(
                f"ResNet expects NHWC images with 3 channels, got shape {tuple(x.shape)}; "
                "convert grayscale/RGBA to RGB and put channels last."
            )
        if with_logits and self.num_classes is None:
            raise ValueError(
                "with_logits=True needs a classifier: build the model with num_classes."
            )
        x = x.astype(self.dtype)
        x = _conv(self.width, 7, 2, 3, "conv1", self.dtype)(x)
        x = nn.relu(_batch_norm(train, "bn1", self.dtype)(x))
        x = cpu_lowering.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
        for i, num_blocks in enumerate(self.stage_sizes):
            x = Stage(
                self.block,
                num_blocks,
                self.width * 2**i,
                1 if i == 0 else 2,
                self.dtype,
                name=f"layer{i + 1}",
            )(x, train)
        features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if not with_logits:
            return features
        logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name="fc")(
            features
        )
        return features, logits.astype(jnp.float32)


RESNET_DEPTHS: dict[str, tuple[tuple[int, ...], type[BasicBlock] | type[Bottleneck]]] = {
    "resnet18": ((2, 2, 2, 2), BasicBlock),
    "resnet34": ((3, 4, 6, 3), BasicBlock),
    "resnet50": ((3, 4, 6, 3), Bottleneck),
    "resnet101": ((3, 4, 23, 3), Bottleneck),
    "resnet152": ((3, 8, 36, 3), Bottleneck),
}


def make_resnet(name: str, **overrides: Any) -> ResNet:
    """Builds ``resnet18`` .. ``resnet152`` (torchvision layouts), overriding module attributes."""
    if name not in RESNET_DEPTHS:
        raise ValueError(f"Unknown ResNet {name!r}; choose one of {sorted(RESNET_DEPTHS)}.")
    stage_sizes, block = RESNET_DEPTHS[name]
    return ResNet(stage_sizes=stage_sizes, block=block, **overrides)
