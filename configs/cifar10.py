"""MSC on one-class CIFAR-10 with ResNet-152: the published recipe (SPEC §2-8).

Command (one class; ``--config.normal_class=all`` runs the 10 classes and writes the table)::

    python -m msad_jax.main --config configs/cifar10.py --workdir runs/cifar10_c0

Needs, once: CIFAR-10 prepared by TFDS (internet + ``pip install 'msad_jax[tf]'``, or the
``cifar-10-binary`` archive in the TFDS manual folder) and the torchvision weights
``resnet152-394f9c45.pth`` (downloaded automatically, or put in ``~/.cache/msad_jax``).

Results: not measured with this project yet (neither accuracy nor run time). Published
(SPEC §9): MSC 98.6% mean ROC-AUC over the 10 classes (97.5% in arXiv v1); DN2, the pretrained
kNN that this run reports as epoch 0, 92.5%. ``--config.dtype=bfloat16`` computes in bfloat16.
"""

from msad_jax.config import default_config


def get_config():
    config = default_config()
    config.dataset = "cifar10"
    config.backbone = "resnet152"
    return config
