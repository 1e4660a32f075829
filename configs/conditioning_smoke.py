"""Conditioning study, smoke run: tiny random ResNet on synthetic gratings, minutes on a CPU.

Command::

    python -m msad_jax.analysis.conditioning --config configs/conditioning_smoke.py \
        --workdir runs/conditioning_smoke

What it does: 2 epochs of 3 steps per loss; writes conditioning.json/.md/.png. Measured with the
command above: 2.2 min wall on a 2-core CPU shared with other jobs, mostly XLA compilation.

Results: none to compare. Random weights: only the flow is being tested, the numbers mean
nothing.
"""

from msad_jax.analysis.study_config import study_config


def get_config():
    config = study_config()
    config.dataset = "synthetic"
    config.synthetic_size = 32
    config.synthetic_train = 48
    config.synthetic_test = 8
    config.normal_class = "0"
    config.backbone = "resnet_tiny"
    config.pretrained = False
    config.learning_rate = 0.01  # random init moves little at the published 1e-5
    config.batch_size = 16
    config.epochs = 2
    config.eval_batch_size = 64
    config.probe_size = 8
    config.hessian_size = 4
    config.progress = False
    return config
