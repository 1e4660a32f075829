"""MSC on one-class CIFAR-10 with ResNet-18, the light recipe: bicubic resize to 224, none frozen.

Command::

    python -m msad_jax.main --config configs/cifar10_resnet18.py --workdir runs/cifar10_r18_c0

Needs the torchvision weights ``resnet18-f37072fd.pth`` (downloaded automatically) and CIFAR-10
prepared by TFDS. Expected: a few points below ResNet-152 (the published code's ResNet-18 option
reaches roughly 95-97% mean ROC-AUC); about 10 minutes per class on one GPU.
"""

from msad_jax.config import default_config


def get_config():
    config = default_config()
    config.dataset = "cifar10"
    config.backbone = "resnet18"
    return config
