"""MSC on one-class Fashion-MNIST with ResNet-152 (grayscale replicated to RGB).

Command::

    python -m msad_jax.main --config configs/fashion_mnist.py --config.normal_class=all \
        --workdir runs/fmnist

Each class trains on its 6000 training images; all 10000 test images are scored.

Results: not measured with this project yet. Published (SPEC §9, approximate figures from
secondary tables): MSC 94.2% mean ROC-AUC, DN2 (the pretrained kNN) 94.5%.
"""

from msad_jax.config import default_config


def get_config():
    config = default_config()
    config.dataset = "fashion_mnist"
    config.backbone = "resnet152"
    return config
