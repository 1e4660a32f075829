"""MSC on one-class CIFAR-100 (20 coarse superclasses) with ResNet-152.

Command::

    python -m msad_jax.main --config configs/cifar100.py --config.normal_class=all \
        --workdir runs/cifar100

Each superclass trains on its 2500 training images and is tested on all 10000 test images (500
normal).

Results: not measured with this project yet. Published (SPEC §9): MSC 96.5% mean ROC-AUC over
the 20 superclasses; DN2 (the pretrained kNN, this run's epoch 0) 89.3%.
"""

from msad_jax.config import default_config


def get_config():
    config = default_config()
    config.dataset = "cifar100"
    config.backbone = "resnet152"
    return config
