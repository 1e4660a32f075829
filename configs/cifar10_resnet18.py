"""MSC on one-class CIFAR-10 with ResNet-18, the light recipe: bicubic resize to 224, none frozen.

Command::

    python -m msad_jax.main --config configs/cifar10_resnet18.py --workdir runs/cifar10_r18_c0

Needs the torchvision weights ``resnet18-f37072fd.pth`` (downloaded automatically) and CIFAR-10
prepared by TFDS.

Results: not measured with this project yet. Published (SPEC §9): no figure for ResNet-18; the
table's MSC figure, 98.6% mean ROC-AUC on CIFAR-10, is for ResNet-152.
"""

from msad_jax.config import default_config


def get_config():
    config = default_config()
    config.dataset = "cifar10"
    config.backbone = "resnet18"
    return config
