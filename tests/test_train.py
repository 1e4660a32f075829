"""The training loop in process: class resolution, per-class tables, divergence, preprocessing."""

import json

import numpy as np
import pytest
from PIL import Image

from msad_jax import run_setup, train
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
    # A tuple of regexes; a comma inside {m,n} is part of its regex, also in the string form.
    wanted = ("^conv1/", "^layer[1-4]{1,2}/")
    assert train.frozen_patterns(smoke_config(frozen=wanted), spec) == wanted
    assert train.frozen_patterns(smoke_config(frozen="^conv1/,^layer[1-4]{1,2}/"), spec) == wanted
    with pytest.raises(ConfigError, match="tuple of regexes"):
        train.frozen_patterns(smoke_config(frozen=3), spec)


def test_frozen_as_a_string_of_earlier_versions_is_the_same_run_as_its_tuple():
    config = smoke_config(frozen=("^conv1/", "^bn1/"))
    earlier = {**train.run_identity(config), "frozen": "^conv1/, ^bn1/"}
    assert run_setup.saved_identity({"identity": earlier}) == train.run_identity(config)
    other = {**earlier, "frozen": "^conv1/"}
    with pytest.raises(train.CheckpointError, match="different config .*frozen"):
        run_setup.check_identity(
            run_setup.saved_identity({"identity": other}), train.run_identity(config)
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


# --------------------------------------------------------------------------------------------
# Hardening: damaged checkpoints, one run per workdir, metrics once, consistent detector.


class _Interrupted(Exception):
    """Stands for a kill: raised by the training step after a number of calls."""


def _interrupt_after(monkeypatch, calls: int, *, nan_params_at: int | None = None):
    """Makes the next runs' training step stop after ``calls`` steps (each run counts anew).

    With ``nan_params_at``, the step of that call returns NaN parameters (and a finite loss),
    as an update that overflows would.
    """
    import jax
    import jax.numpy as jnp

    original = train.pmap_train_step

    def patched(step, **kwargs):
        pmapped = original(step, **kwargs)
        count = [0]

        def wrapped(state, batch, center):
            if count[0] == calls:
                raise _Interrupted
            state, metrics = pmapped(state, batch, center)
            count[0] += 1
            if count[0] == nan_params_at:
                params = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), state.params)
                state = state.replace(params=params)
            return state, metrics

        return wrapped

    monkeypatch.setattr(train, "pmap_train_step", patched)


def _snapshot(folder):
    """Every file under ``folder`` with its bytes and modification time."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _train_steps(workdir):
    from msad_jax.metric_writer import read_metrics

    return [r["step"] for r in read_metrics(workdir / "metrics.jsonl") if "loss" in r]


def _eval_epochs(workdir):
    from msad_jax.metric_writer import read_metrics

    return [r["epoch"] for r in read_metrics(workdir / "metrics.jsonl") if "auroc" in r]


HARDENING = dict(epochs=1, checkpoint_every_steps=1, log_every_steps=1, keep_checkpoints=2)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished synthetic run: 2 steps, checkpoints after each (steps 0, 1, 2; 2 kept)."""
    workdir = tmp_path_factory.mktemp("finished")
    report = train.train_and_evaluate(smoke_config(**HARDENING), str(workdir))
    return workdir, report


@pytest.fixture
def finished_copy(finished_run, tmp_path):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(finished_run[0], workdir)
    return workdir, finished_run[1]


def test_nan_parameters_in_a_checkpoint_are_damage(finished_copy):
    from msad_jax.checkpointing import DamagedCheckpointError

    workdir, _ = finished_copy
    checkpoints = RunCheckpoints(workdir / "checkpoints", asynchronous=False, max_to_keep=5)
    state = checkpoints.restore_arrays(2)
    state["params"]["conv1"]["kernel"][0, 0, 0, 0] = np.nan
    checkpoints.save(3, state, checkpoints.read_progress(2))  # a valid digest of NaN values
    checkpoints.wait()
    with pytest.raises(DamagedCheckpointError, match="params hold NaN"):
        checkpoints.restore_arrays(3)
    checkpoints.close()


def test_a_damaged_detector_file_is_named(finished_copy):
    from msad_jax.detector import Detector

    workdir, _ = finished_copy
    path = workdir / "detector.npz"
    with np.load(path) as saved:
        arrays = {k: saved[k] for k in saved.files}
    arrays["gallery"] = arrays["gallery"] + 1e-3  # values changed, digest kept
    np.savez(path, **arrays)
    with pytest.raises(train.CheckpointError, match=f"{path} is damaged"):
        Detector.load(workdir)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(train.CheckpointError, match=f"{path} cannot be read"):
        Detector.load(workdir)


def test_detector_never_calls_a_nan_score_normal(finished_run):
    import dataclasses

    import jax

    from msad_jax.detector import Detector, NonFiniteScoresError

    detector = Detector.load(finished_run[0])
    images = train.load_data(smoke_config(**HARDENING), 0).test_images[:4]
    assert np.isfinite(detector.score(images)).all()
    params = jax.tree.map(lambda x: np.full_like(x, np.nan), detector.variables["params"])
    broken = dataclasses.replace(detector, variables={**detector.variables, "params": params})
    with pytest.raises(NonFiniteScoresError, match="4 of 4 scores are NaN"):
        broken.predict(images)


@pytest.mark.parametrize(
    "change",
    [{"synthetic_train": 32}, {"synthetic_size": 24}, {"image_size": 48}, {"train_images": 40}],
)
def test_a_finished_workdir_refuses_other_data_and_writes_nothing(finished_copy, change):
    workdir, _ = finished_copy
    before = _snapshot(workdir)
    key = next(iter(change))
    with pytest.raises(train.CheckpointError, match=f"different config .*{key}"):
        train.train_and_evaluate(smoke_config(**HARDENING, **change), str(workdir))
    assert _snapshot(workdir) == before


def test_a_folder_run_refuses_another_folder_or_changed_files(tmp_path):
    import shutil

    arrays = synthetic_arrays(train_per_class=24, test_per_class=6, seed=1)
    _write_class_folders(tmp_path / "images", arrays, classes=(0, 5))
    config = smoke_config(dataset="folder", data_dir=str(tmp_path / "images"), epochs=0)
    train.train_and_evaluate(config, str(tmp_path / "run"))
    before = _snapshot(tmp_path / "run")
    shutil.copytree(tmp_path / "images", tmp_path / "copy")
    moved = smoke_config(dataset="folder", data_dir=str(tmp_path / "copy"), epochs=0)
    with pytest.raises(train.CheckpointError, match="different config .*data_dir"):
        train.train_and_evaluate(moved, str(tmp_path / "run"))
    anomalies = tmp_path / "images" / "test" / "grating_090deg"
    (anomalies / "copy.png").write_bytes(next(anomalies.iterdir()).read_bytes())
    with pytest.raises(train.CheckpointError, match="data folder's files"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert _snapshot(tmp_path / "run") == before


def test_more_epochs_and_two_kills_keep_metrics_detector_and_reports_consistent(
    finished_copy, monkeypatch
):
    from msad_jax.detector import Detector

    workdir, report = finished_copy
    detector_bytes = (workdir / "detector.npz").read_bytes()
    # 2 steps per epoch; the extension (allowed: epochs and checkpoint spacing are not part of
    # the run's identity) saves at steps 3, 4, 6 and 8 and keeps one checkpoint.
    longer = smoke_config(
        **{**HARDENING, "epochs": 4, "keep_checkpoints": 1, "checkpoint_every_steps": 3}
    )
    _interrupt_after(monkeypatch, 3)  # runs steps 3-5; killed with step 5 logged, not saved
    with pytest.raises(_Interrupted):
        train.train_and_evaluate(longer, str(workdir))
    assert _train_steps(workdir) == [1, 2, 3, 4, 5]
    checkpoints = RunCheckpoints(workdir / "checkpoints")
    assert checkpoints.all_steps() == [2, 4]  # step 2 is kept for the detector despite keep=1
    assert (workdir / "detector.npz").read_bytes() == detector_bytes
    assert json.loads((workdir / "report.json").read_text())["checkpoint_step"] == 2
    detector = Detector.load(workdir)
    saved = checkpoints.restore_arrays(2)
    for got, want in zip(
        _leaves(detector.variables["params"]), _leaves(saved["params"]), strict=True
    ):
        np.testing.assert_array_equal(got, want)
    checkpoints.close()
    data = train.load_data(longer, 0)
    np.testing.assert_allclose(
        detector.score(data.test_images),
        np.load(workdir / "detector.npz")["test_scores"],
        rtol=1e-5,
    )
    _interrupt_after(monkeypatch, 3)  # resumes at 4, runs 5-7; killed with 7 logged, 6 saved
    with pytest.raises(_Interrupted):
        train.train_and_evaluate(longer, str(workdir))
    assert _train_steps(workdir) == [1, 2, 3, 4, 5, 6, 7]
    monkeypatch.undo()
    finished = train.train_and_evaluate(longer, str(workdir))
    assert finished["checkpoint_step"] == 8 and report["checkpoint_step"] == 2
    assert int(np.load(workdir / "detector.npz")["checkpoint_step"]) == 8
    assert _train_steps(workdir) == list(range(1, 9))
    assert _eval_epochs(workdir) == [0, 1, 2, 3, 4]
    assert [h["epoch"] for h in finished["history"]] == [0, 1, 2, 3, 4]


def test_nan_features_stop_the_run_and_blame_the_parameters(finished_copy, monkeypatch):
    workdir, _ = finished_copy
    _interrupt_after(monkeypatch, 100, nan_params_at=2)  # the epoch's last update overflows
    with pytest.raises(train.TrainingDivergedError) as err:
        train.train_and_evaluate(smoke_config(**{**HARDENING, "epochs": 2}), str(workdir))
    message = str(err.value)
    assert "At step 4 the model's features became NaN" in message and "scorer" not in message
    assert "start a new --workdir with a lower config.learning_rate" in message
    assert RunCheckpoints(workdir / "checkpoints").all_steps() == [2, 3]  # nothing NaN saved


def test_a_live_run_in_the_workdir_is_refused_before_anything_is_written(tmp_path):
    import socket
    import subprocess
    import sys

    from msad_jax.workdir import LOCK_FILE, WorkdirBusyError, process_start_time

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = {"host": socket.gethostname(), "pid": holder.pid, "started": "earlier",
                "process_start": process_start_time(holder.pid)}  # fmt: skip
        (tmp_path / LOCK_FILE).write_text(json.dumps(lock))
        with pytest.raises(WorkdirBusyError, match=f"process {holder.pid} on host"):
            train.train_and_evaluate(smoke_config(), str(tmp_path))
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]
    finally:
        holder.kill()
        holder.wait()


def test_knn_k_needs_more_training_images(tmp_path):
    with pytest.raises(ConfigError, match="knn_k=2 needs more than 2 training images"):
        train.train_and_evaluate(smoke_config(train_images=2), str(tmp_path))
