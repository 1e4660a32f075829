"""MSC on CatsVsDogs (one-vs-rest, 2 classes) with ResNet-152.

Command::

    python -m msad_jax.main --config configs/cats_vs_dogs.py --config.normal_class=all \
        --workdir runs/cats_vs_dogs

Uses TFDS ``cats_vs_dogs`` with the fixed, seeded per-class split of msad_jax.data (2500 test
images per class, the rest for training).

Results: not measured with this project yet. Published (SPEC §9, approximate figures from
secondary tables): MSC ~99.3% mean ROC-AUC (unverified), DN2 (the pretrained kNN, this run's
epoch 0) 97.5%.
"""

from msad_jax.config import default_config


def get_config():
    config = default_config()
    config.dataset = "cats_vs_dogs"
    config.backbone = "resnet152"
    return config
