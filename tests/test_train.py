"""The training loop in process: class resolution, per-class tables, divergence, preprocessing."""

import json

import numpy as np
import pytest
from PIL import Image

from msad_jax import train
from msad_jax.checkpointing import RunCheckpoints
from msad_jax.config import ConfigError, default_config
from msad_jax.data.synthetic import synthetic_arrays
from msad_jax.models import backbone_spec


def smoke_config(**changes):
    config = default_config()
    config.update(
        dataset="synthetic", synthetic_train=64, synthetic_test=8, backbone="resnet_tiny",
        pretrained=False, learning_rate=0.01, batch_size=32, epochs=1, eval_batch_size=64,
        progress=False, plots=False, checkpoint_every_steps=0,
    )  # fmt: skip
    config.update(changes)
    return config


def test_normal_class_accepts_index_name_and_all():
    assert train.normal_classes(smoke_config(normal_class="3")) == [3]
    assert train.normal_classes(smoke_config(normal_class="grating_036deg")) == [2]
    assert train.normal_classes(smoke_config(normal_class="all")) == list(range(10))
    with pytest.raises(ConfigError, match="out of range"):
        train.normal_classes(smoke_config(normal_class="10"))
    with pytest.raises(ConfigError, match="not a class of synthetic"):
        train.normal_classes(smoke_config(normal_class="cat"))


def test_preprocessing_and_frozen_overrides():
    spec = backbone_spec("resnet152")
    assert train.preprocessing_for(smoke_config(), spec) == spec.preprocessing
    prep = train.preprocessing_for(
        smoke_config(resize=160, crop=128, resize_method="bicubic"), spec
    )
    assert (prep.resize, prep.crop, prep.method, prep.size) == (160, 128, "bicubic", 128)
    assert train.preprocessing_for(smoke_config(resize=96, crop=0), spec).size == 96
    with pytest.raises(ConfigError, match="crop"):
        train.preprocessing_for(smoke_config(resize=96, crop=128), spec)
    assert train.frozen_patterns(smoke_config(), spec) == spec.frozen
    assert train.frozen_patterns(smoke_config(frozen=""), spec) == ()
    assert train.frozen_patterns(smoke_config(frozen="^conv1/, ^bn1/"), spec) == (
        "^conv1/",
        "^bn1/",
    )


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    config = smoke_config(learning_rate=1e30, epochs=3, log_every_steps=1)
    with pytest.raises(train.TrainingDivergedError, match="became nan .* last good checkpoint"):
        train.train_and_evaluate(config, str(tmp_path))
    checkpoints = RunCheckpoints(tmp_path / "checkpoints")
    state = checkpoints.restore_arrays()
    assert all(np.isfinite(leaf).all() for leaf in _leaves(state["params"]))
    assert not (tmp_path / "report.json").exists()


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def _write_class_folders(root, arrays, classes):
    for split, images, labels in (
        ("train", arrays.train_images, arrays.train_labels),
        ("test", arrays.test_images, arrays.test_labels),
    ):
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            if label in classes:
                folder = root / split / arrays.class_names[label]
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(folder / f"{i}.png")


def test_all_classes_of_a_folder_give_the_per_class_table(tmp_path):
    arrays = synthetic_arrays(train_per_class=40, test_per_class=10, seed=1)
    _write_class_folders(tmp_path / "images", arrays, classes=(0, 5))
    config = smoke_config(dataset="folder", data_dir=str(tmp_path / "images"), normal_class="all",
                          batch_size=16, eval_every_epochs=0)  # fmt: skip
    summary = train.train_and_evaluate(config, str(tmp_path / "run"))
    reports = summary["classes"]
    assert [r["class_name"] for r in reports] == ["grating_000deg", "grating_090deg"]
    assert summary["mean_auroc"] == pytest.approx(np.mean([r["final"]["auroc"] for r in reports]))
    for r in reports:
        assert r["counts"] == {"train": 40, "test": 20, "test_normal": 10, "test_anomalous": 10}
        assert [h["epoch"] for h in r["history"]] == [0, 1]  # final epoch always evaluated
    table = (tmp_path / "run" / "report.md").read_text()
    assert "grating_000deg" in table and "grating_090deg" in table
    assert (tmp_path / "run" / "report.csv").read_text().count("\n") >= 3
    assert json.loads((tmp_path / "run" / "report.json").read_text())[
        "mean_auroc"
    ] == pytest.approx(summary["mean_auroc"])
    assert (tmp_path / "run" / "class_00_grating_000deg" / "detector.npz").is_file()


def test_max_steps_stops_early_and_still_evaluates(tmp_path):
    config = smoke_config(epochs=5, max_steps=3, eval_every_epochs=0)  # 2 steps per epoch
    report = train.train_and_evaluate(config, str(tmp_path))
    assert RunCheckpoints(tmp_path / "checkpoints").latest_step() == 3
    history = report["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]  # epoch 2 stops after its first step
    assert ["auroc" in h for h in history] == [True, False, True]
    assert history[-1]["step"] == 3


def test_resuming_with_a_different_recipe_is_refused(tmp_path):
    train.train_and_evaluate(smoke_config(max_steps=1), str(tmp_path))
    with pytest.raises(train.CheckpointError, match="different config .*learning_rate"):
        train.train_and_evaluate(smoke_config(max_steps=1, learning_rate=0.5), str(tmp_path))


def test_subset_keys_reduce_the_problem():
    data = train.load_data(smoke_config(train_images=20, test_images=30), 0)
    assert len(data.train_images) == 20 and len(data.test_images) == 30
    assert data.counts()["test_normal"] == 3  # 8 of 80 test images are normal: 10% of 30
