"""The side-by-side study and its command, on a tiny random model and synthetic data."""

import json

import numpy as np
import pytest

from msad_jax.analysis import study, study_cli
from msad_jax.analysis.study_config import study_config, validate_study_config
from msad_jax.config import ConfigError


def tiny_config(**changes):
    config = study_config()
    config.update(
        dataset="synthetic", synthetic_train=24, synthetic_test=3, backbone="resnet_tiny",
        pretrained=False, learning_rate=0.05, batch_size=16, epochs=1, eval_batch_size=64,
        probe_size=4, hessian_size=2, progress=False, uniformity_samples=20,
    )  # fmt: skip
    config.update(changes)
    return config


@pytest.mark.slow
def test_study_writes_both_runs_from_the_same_start(tmp_path):
    results = study.run_study(tiny_config(), str(tmp_path))
    runs = results["runs"]
    assert list(runs) == ["contrastive", "msc"]
    assert [r["epoch"] for r in runs["contrastive"]] == [0, 1] == [r["epoch"] for r in runs["msc"]]
    first = {loss: records[0] for loss, records in runs.items()}
    # Epoch 0 is the same model: same kNN and geometry, but each loss has its own gradients.
    for key in ("auroc", "compactness", "uniformity_phi", "uniformity_theta", "probe_compactness"):
        assert first["contrastive"][key] == first["msc"][key]
    assert first["contrastive"]["feat_ratio"] != first["msc"]["feat_ratio"]
    # After one epoch the two losses have moved the model differently.
    assert runs["contrastive"][1]["compactness"] != runs["msc"][1]["compactness"]
    assert runs["msc"][1]["step"] == results["steps_per_epoch"] == 2
    for record in runs["contrastive"] + runs["msc"]:
        assert 0.0 <= record["auroc"] <= 1.0
        assert record["hessian_dim"] == 4 * (8 * 8 - 1)  # 2B (D - 1), resnet_tiny: D = 64
        assert np.isfinite(record["radial_drift"])
        assert record["probe_loss"] == pytest.approx(
            record["probe_align"] + record["probe_uniform"], rel=1e-5
        )
    on_disk = json.loads((tmp_path / "conditioning.json").read_text())
    assert on_disk["runs"]["msc"][1]["compactness"] == runs["msc"][1]["compactness"]
    markdown = (tmp_path / "conditioning.md").read_text()
    assert "| epoch | ROC-AUC % (standard) | ROC-AUC % (MSC) |" in markdown
    assert "## End points" in markdown
    assert (tmp_path / "conditioning.png").stat().st_size > 0


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"study_losses": "contrastive,simclr"}, "study_losses"),
        ({"hessian_size": 9, "probe_size": 4}, "hessian_size"),
        ({"angular": True}, "angular"),
        ({"normal_class": "all"}, "one normal class"),
        ({"uniformity_samples": 1}, "uniformity_samples"),
        ({"nonsense": 1}, "Unknown config key"),
        ({"learning_rate": -1.0}, "learning_rate"),
    ],
)
def test_bad_study_configs_are_named(changes, message):
    config = tiny_config()
    with config.unlocked():
        for key, value in changes.items():
            config[key] = value
    with pytest.raises(ConfigError, match=message):
        validate_study_config(config)


def test_command_line_errors_are_one_line(tmp_path, capsys):
    config_file = tmp_path / "c.py"
    config_file.write_text(
        "from msad_jax.analysis.study_config import study_config\n"
        "def get_config():\n    return study_config()\n"
    )
    for argv, message in (
        ([f"--config={config_file}", "--config.nonsense=1", f"--workdir={tmp_path}"], "nonsense"),
        (["--config=/nope/missing.py", f"--workdir={tmp_path}"], "not found"),
        ([f"--config={config_file}"], "--workdir is required"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            study_cli.run_cli(["conditioning", *argv])
        assert exit_info.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
