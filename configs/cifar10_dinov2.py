"""MSC on one-class CIFAR-10 with DINOv2 ViT-B/14 (Meta's weights from the Hugging Face Hub).

Command (one class; ``--config.normal_class=all`` runs the 10 classes and writes the table)::

    python -m msad_jax.main --config configs/cifar10_dinov2.py --workdir runs/cifar10_dinov2_c0

Cheaper: ``--config.backbone=dinov2_vits14`` (ViT-S/14); registers: ``dinov2_vitb14_reg``;
ViT-B/16 with timm's ImageNet-21k -> 1k weights: ``--config.backbone=vit_base_patch16_224``.

Needs, once: CIFAR-10 prepared by TFDS (see configs/cifar10.py) and the weights file
``facebook/dinov2-base`` ``model.safetensors`` (downloaded automatically into ``~/.cache/msad_jax``
as ``facebook--dinov2-base--model.safetensors``; offline, put it there by hand).

Recipe: the published MSC recipe (SPEC §2-7: MSC loss, temperature 0.25, SGD without momentum,
weight decay 5e-5, batch 64, 20 epochs, kNN k = 2) with the backbone's defaults from
``msad_jax.models.registry``: resize 256, center crop 224 (a 16 x 16 grid of 14 px patches),
bicubic, ImageNet mean/std; patch embedding, tokens, position embeddings and blocks 0-5 frozen;
learning rate 1e-4 (``BackboneSpec.learning_rate``) -- a starting point chosen by analogy, not a
measured optimum: try 1e-5 and 1e-3 on one class first. ``--config.dtype=bfloat16`` computes in
bfloat16 (its speed with this backbone has not been measured).

Results: not measured with this project yet (neither accuracy nor run time; CPU throughput of the
backbones beside ResNet-50: benchmarks/results/vit_backbones.md). Published one-class CIFAR-10
mean ROC-AUC, for reference: MSC 98.6% with ResNet-152 (the paper); FITYMI and GeneralAD 99.1%
with ViT-B/16 (their papers; other methods, not MSC).
"""

from msad_jax.config import default_config
from msad_jax.models import backbone_spec


def get_config():
    config = default_config()
    config.dataset = "cifar10"
    config.backbone = "dinov2_vitb14"
    config.learning_rate = backbone_spec(config.backbone).learning_rate
    return config
