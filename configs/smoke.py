"""Smoke run: tiny ResNet, random init, synthetic gratings; the whole flow in seconds on a CPU.

Command::

    python -m msad_jax.main --config configs/smoke.py --workdir /tmp/msad_smoke

Expected: finishes in well under a minute on a laptop CPU (2 epochs of 7 steps); prints ROC-AUC
at epoch 0 and after each epoch (any value in [0, 1] -- random weights, so only the plumbing is
being tested) and writes report.json/.md, roc.png, scores.png, training.png, metrics.jsonl,
checkpoints/ and detector.npz to the workdir.
"""

from msad_jax.config import default_config


def get_config():
    config = default_config()
    config.dataset = "synthetic"
    config.synthetic_size = 32
    config.synthetic_train = 200
    config.synthetic_test = 20
    config.normal_class = "0"
    config.backbone = "resnet_tiny"
    config.pretrained = False
    config.learning_rate = 0.01  # random init moves little at the published 1e-5
    config.batch_size = 32
    config.epochs = 2
    config.eval_batch_size = 128
    config.checkpoint_every_steps = 3
    config.log_every_steps = 1
    return config
