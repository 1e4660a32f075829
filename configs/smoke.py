"""Smoke run: tiny ResNet, random init, synthetic gratings; the whole flow, small enough for CI.

Command::

    python -m msad_jax.main --config configs/smoke.py --workdir runs/smoke

What it does: 2 epochs of 7 steps; prints the ROC-AUC at epoch 0 and after each epoch and writes
report.json/.md, roc.png, scores.png, training.png, metrics.jsonl, checkpoints/ and detector.npz
to the workdir (``tests/test_main.py`` runs it).

Results: none to compare. The weights are random, so the ROC-AUC is any value in [0, 1]; only the
flow is being tested.
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
