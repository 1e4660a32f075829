"""MSC on one-class CIFAR-100 (20 coarse superclasses) with ResNet-152.

Command::

    python -m msad_jax.main --config configs/cifar100.py --config.normal_class=all \
        --workdir runs/cifar100

Each superclass trains on its 2500 training images and is tested on all 10000 test images (500
normal). Expected: 96.5% mean ROC-AUC over the 20 superclasses (paper); DN2 (epoch 0) about 89%.
"""

from msad_jax.config import default_config


def get_config():
    config = default_config()
    config.dataset = "cifar100"
    config.backbone = "resnet152"
    return config
