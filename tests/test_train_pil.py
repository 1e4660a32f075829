"""Training with host (Pillow) views and Pillow evaluation resizing; the epoch's weighted loss."""

import numpy as np
import pytest

from msad_jax import train
from msad_jax.config import ConfigError, default_config, validate_config
from msad_jax.data.pipeline import epoch_mean_loss
from msad_jax.metric_writer import read_metrics


def smoke_config(**changes):
    config = default_config()
    config.update(
        dataset="synthetic", synthetic_train=40, synthetic_test=6, synthetic_size=24,
        backbone="resnet_tiny", pretrained=False, learning_rate=0.01, batch_size=16, epochs=1,
        eval_batch_size=64, progress=False, plots=False, checkpoint_every_steps=0,
        log_every_steps=1,
    )  # fmt: skip
    config.update(changes)
    return config


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("augment", "gpu", r"config.augment='gpu' is not one of device, pil\."),
        ("eval_resize", "round", r"config.eval_resize='round' is not one of float, pil\."),
        ("augment_workers", -1, r"config.augment_workers=-1 must be >= 0\."),
    ],
)
def test_bad_values_are_one_line_errors(key, value, message):
    assert default_config().augment == "device" and default_config().eval_resize == "float"
    validate_config(smoke_config(augment="pil", eval_resize="pil"))
    with pytest.raises(ConfigError, match=message) as info:
        validate_config(smoke_config(**{key: value}))
    assert "\n" not in str(info.value)


def test_epoch_mean_loss_weights_steps_by_batch_size():
    losses, counts = [3.5, 3.25, 2.0], [64, 64, 8]
    assert epoch_mean_loss(losses, counts) == pytest.approx(np.average(losses, weights=counts))
    assert epoch_mean_loss(losses, counts) != pytest.approx(np.mean(losses))
    with pytest.raises(ValueError, match="as many losses"):
        epoch_mean_loss(losses, counts[:2])


def test_pil_run_reports_the_sample_weighted_epoch_loss(tmp_path):
    config = smoke_config(augment="pil", eval_resize="pil", augment_workers=2, epochs=2)
    report = train.train_and_evaluate(config, str(tmp_path))
    steps = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))  # 40 images, batch 16: 3 steps/epoch
    assert all("count" not in r for r in steps)
    for epoch in (1, 2):
        losses = [r["loss"] for r in steps if r["epoch"] == epoch - 1]
        record = report["history"][epoch]
        assert record["mean_loss"] == pytest.approx(np.average(losses, weights=[16, 16, 8]))
        assert record["mean_loss"] != pytest.approx(np.mean(losses))
    assert 0.0 <= report["final"]["auroc"] <= 1.0 and np.isfinite(steps[-1]["loss"])
    # the host views and the Pillow resizing change what the model sees
    device = train.train_and_evaluate(smoke_config(), str(tmp_path / "device"))
    assert report["pretrained"]["auroc"] != device["pretrained"]["auroc"] or (
        report["history"][1]["mean_loss"] != device["history"][1]["mean_loss"]
    )
    with pytest.raises(train.CheckpointError, match="augment: 'pil' -> 'device'"):
        train.train_and_evaluate(smoke_config(eval_resize="pil", epochs=2), str(tmp_path))
