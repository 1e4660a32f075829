"""MSC on your own images, e.g. an MVTec AD category, with ResNet-152.

Command::

    python -m msad_jax.main --config configs/folder.py \
        --config.data_dir=/data/mvtec/bottle --workdir runs/bottle

Layouts (a folder or a .zip): one MVTec AD category (``train/good``, ``test/<defect|good>``), the
MVTec AD root (``--config.normal_class=all`` runs the 15 categories and writes the table),
``train/normal`` + ``test/normal`` + ``test/anomalous``, or class-per-folder ``train/<class>`` +
``test/<class>`` (choose the normal class with ``--config.normal_class``).
Images of any mode are converted to RGB. Sizes (``config.image_size=0``, the default): images
larger than 256 px (longer side), or all images when their sizes differ, are resized while they
are decoded (shorter side 256, center crop), so huge photos never fill the memory; images that all
share one size up to 256 px keep it. ``--config.image_size=N`` resizes every image to N.

Results: not measured with this project yet. Published (SPEC §9) on MVTec AD: MSC 87.2% mean
image-level ROC-AUC over the 15 categories.
"""

from msad_jax.config import default_config


def get_config():
    config = default_config()
    config.dataset = "folder"
    config.data_dir = ""  # set with --config.data_dir=<folder or .zip>
    config.normal_class = "0"  # a category folder has one train class ('good'); a root: 'all'
    config.backbone = "resnet152"
    return config
