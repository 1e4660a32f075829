"""The main job end to end, as a user runs it: subprocesses of ``python -m msad_jax.main``."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from msad_jax.checkpointing import RunCheckpoints
from msad_jax.detector import Detector
from msad_jax.metric_writer import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.py")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.slow


def _run(*args, env=None, timeout=600):
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _main(workdir, *overrides, env=None):
    return _run(
        "-m", "msad_jax.main", "--config", SMOKE, "--workdir", str(workdir),
        "--config.progress=False", *overrides, env=env,
    )  # fmt: skip


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("smoke")
    proc = _main(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc


def test_smoke_run_writes_report_plots_and_checkpoints(smoke_run):
    workdir, proc = smoke_run
    report = json.loads((workdir / "report.json").read_text())
    assert 0.0 <= report["final"]["auroc"] <= 1.0
    assert 0.0 <= report["pretrained"]["auroc"] <= 1.0
    assert [h["epoch"] for h in report["history"]] == [0, 1, 2]
    assert report["counts"] == {"train": 200, "test": 200, "test_normal": 20, "test_anomalous": 180}
    assert "ROC-AUC" in proc.stderr and "done:" in proc.stderr
    assert "| 2 |" in (workdir / "report.md").read_text()
    for plot in ("roc.png", "scores.png", "training.png"):
        assert (workdir / plot).read_bytes()[:8] == PNG_MAGIC, plot
    assert RunCheckpoints(workdir / "checkpoints").latest_step() == 14  # 2 epochs x 7 steps
    records = read_metrics(workdir / "metrics.jsonl")
    assert [r["epoch"] for r in records if "auroc" in r] == [0, 1, 2]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 15))
    assert list((workdir / "tensorboard").iterdir())


def test_detector_reproduces_the_runs_scores(smoke_run):
    import ml_collections

    from msad_jax.train import load_data

    workdir, _ = smoke_run
    saved = np.load(workdir / "detector.npz")
    detector = Detector.load(workdir)
    config = ml_collections.ConfigDict(json.loads((workdir / "run.json").read_text())["config"])
    data = load_data(config, 0)
    scores = detector.score(data.test_images)
    np.testing.assert_allclose(scores, saved["test_scores"], rtol=1e-5, atol=1e-7)
    # The threshold is the 0.95 quantile of the leave-one-out training scores.
    assert np.mean(saved["train_scores"] > detector.threshold) == pytest.approx(0.05, abs=0.01)
    np.testing.assert_array_equal(detector.predict(data.test_images), scores > detector.threshold)


def test_score_command_prints_a_score_and_label_per_image(smoke_run, tmp_path):
    from PIL import Image

    from msad_jax.data.synthetic import synthetic_arrays

    workdir, _ = smoke_run
    arrays = synthetic_arrays(train_per_class=1, test_per_class=1, seed=5)
    for i, image in enumerate(arrays.test_images[:3]):
        Image.fromarray(image).resize((48, 40)).save(tmp_path / f"img{i}.png")
    proc = _run("-m", "msad_jax.score", "--workdir", str(workdir), str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [
        str(tmp_path / f"img{i}.png") for i in range(3)
    ]
    for line in lines:
        _, score, label = line.split("\t")
        assert float(score) >= 0.0 and label in ("normal", "anomalous")


KILL_AFTER_STEPS = 11  # mid-epoch 2 (7 steps per epoch); checkpoints every 3 steps

KILLING_RUN = textwrap.dedent(
    """
    import os, signal, sys
    import jax
    from absl import app
    from msad_jax import main, train
    from msad_jax.checkpointing import RunCheckpoints

    # Saves are asynchronous in real runs; here each save completes before training goes on, so
    # the kill below always comes after the step-9 checkpoint (a mid-epoch one) is on disk.
    class FinishedSaves(RunCheckpoints):
        def __init__(self, directory, **kwargs):
            super().__init__(directory, **{{**kwargs, "asynchronous": False}})

    train.RunCheckpoints = FinishedSaves
    original = train.pmap_train_step

    def killing_pmap_train_step(step, **kwargs):
        pmapped = original(step, **kwargs)
        calls = [0]

        def wrapped(state, batch, center):
            out = pmapped(state, batch, center)
            calls[0] += 1
            if calls[0] == {kill_after}:
                jax.block_until_ready(out)
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        return wrapped

    train.pmap_train_step = killing_pmap_train_step
    sys.argv = ["main", *sys.argv[1:]]
    app.run(main.main, flags_parser=main.parse_flags)
    """
)


def test_killed_run_resumes_to_the_same_parameters(tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = _run(
        "-c", KILLING_RUN.format(kill_after=KILL_AFTER_STEPS), "--config", SMOKE,
        "--workdir", str(killed), "--config.progress=False",
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    interrupted_at = RunCheckpoints(killed / "checkpoints").latest_step()
    assert 7 < interrupted_at < KILL_AFTER_STEPS  # a mid-epoch checkpoint of epoch 2
    assert not (killed / "report.json").exists()
    lock = json.loads((killed / "run.lock").read_text())  # left behind by the killed run
    assert {"host", "pid", "started"} <= set(lock) and lock["pid"] != os.getpid()
    logged = [r["step"] for r in read_metrics(killed / "metrics.jsonl") if "loss" in r]
    assert logged == list(range(1, len(logged) + 1)) and logged[-1] > interrupted_at

    resumed = _main(killed)  # takes the dead run's lock over
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from step {interrupted_at}" in resumed.stderr
    assert not (killed / "run.lock").exists()
    records = read_metrics(killed / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 15))  # each step once
    assert [r["epoch"] for r in records if "auroc" in r] == [0, 1, 2]
    uninterrupted = _main(clean)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    a = RunCheckpoints(killed / "checkpoints").restore_arrays()
    b = RunCheckpoints(clean / "checkpoints").restore_arrays()
    assert int(a["step"]) == int(b["step"]) == 14
    for name in ("params", "opt_state", "center", "rng"):
        for x, y in zip(jax_leaves(a[name]), jax_leaves(b[name]), strict=True):
            np.testing.assert_array_equal(x, y, err_msg=name)
    report_a = json.loads((killed / "report.json").read_text())
    report_b = json.loads((clean / "report.json").read_text())
    assert report_a["final"] == report_b["final"]
    assert [h.get("auroc") for h in report_a["history"]] == [
        h.get("auroc") for h in report_b["history"]
    ]


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def _assert_one_line_error(proc, *fragments):
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    for fragment in fragments:
        assert fragment in last, (fragment, last)


def test_unknown_config_key_lists_the_valid_ones(tmp_path):
    proc = _main(tmp_path, "--config.learning_rat=0.1")
    _assert_one_line_error(proc, "learning_rat", "valid keys are:", "learning_rate")


def test_unknown_dataset_is_named(tmp_path):
    proc = _main(tmp_path, "--config.dataset=imagenet")
    _assert_one_line_error(proc, "imagenet", "cifar10")


def test_missing_weights_offline_say_where_to_put_them(tmp_path):
    proc = _main(
        tmp_path / "run", "--config.backbone=resnet18", "--config.pretrained=True",
        env={"MSAD_JAX_OFFLINE": "1", "MSAD_JAX_CACHE": str(tmp_path / "cache"),
             "TORCH_HOME": str(tmp_path / "torch")},
    )  # fmt: skip
    _assert_one_line_error(proc, "resnet18-f37072fd.pth", str(tmp_path / "cache"))


def test_damaged_checkpoint_leaves_scoring_alone_and_training_resumes_before_it(
    tmp_path, smoke_run
):
    import shutil

    workdir = tmp_path / "damaged"
    shutil.copytree(smoke_run[0], workdir)
    data_files = [p for p in (workdir / "checkpoints" / "14" / "state").rglob("*") if p.is_file()]
    largest = max((p for p in data_files if "d" in p.parts), key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64  # bytes overwritten in place
    largest.write_bytes(data)
    folder = str(workdir / "checkpoints" / "14")
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(images / "grey.png")
    # The detector file carries the parameters it was built with: scoring reads no checkpoint.
    scored = _run("-m", "msad_jax.score", "--workdir", str(workdir), str(images))
    undamaged = _run("-m", "msad_jax.score", "--workdir", str(smoke_run[0]), str(images))
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert scored.stdout.split("\t")[1:] == undamaged.stdout.split("\t")[1:]

    resumed = _main(workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reported = [line for line in resumed.stderr.splitlines() if "is damaged" in line]
    assert len(reported) == 1 and f"{folder} is damaged" in reported[0]
    assert f"moved it to {workdir / 'damaged_checkpoints' / '14'}" in reported[0]
    assert (workdir / "damaged_checkpoints" / "14" / "state").is_dir()  # kept, not deleted
    assert "Resuming from step 12" in resumed.stderr
    records = read_metrics(workdir / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 15))
    assert [r["epoch"] for r in records if "auroc" in r] == [0, 1, 2]
    # Resumed from the intact step 12: the same result as the undamaged run.
    original = json.loads((smoke_run[0] / "report.json").read_text())
    assert json.loads((workdir / "report.json").read_text())["final"] == original["final"]


def test_second_live_run_on_a_workdir_is_refused_at_once(tmp_path):
    import socket

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        lock = {"host": socket.gethostname(), "pid": holder.pid, "started": "2026-01-01T10:00"}
        (tmp_path / "run.lock").write_text(json.dumps(lock))
        proc = _main(tmp_path)
        _assert_one_line_error(proc, f"process {holder.pid} on host", "2026-01-01T10:00")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run.lock"]  # nothing else done
    finally:
        holder.kill()
        holder.wait()


def test_workdir_that_is_a_file_is_one_line(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    _assert_one_line_error(_main(path), f"--workdir {path} is an existing file")
    assert path.read_text() == "mine"


def test_cifar10_offline_without_tensorflow_says_what_to_do(tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is installed: the dataset would be prepared")
    proc = _run(
        "-m", "msad_jax.main", "--config", os.path.join(ROOT, "configs", "cifar10.py"),
        "--workdir", str(tmp_path / "run"), "--config.backbone=resnet_tiny",
        "--config.pretrained=False", env={"TFDS_DATA_DIR": str(tmp_path / "tfds")},
    )  # fmt: skip
    _assert_one_line_error(proc, "pip install 'msad_jax[tf]'", str(tmp_path / "tfds"))
    assert "Variant folder" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_debug_switch_gives_the_traceback_of_a_user_error(tmp_path):
    proc = _main(tmp_path, "--config.dataset=imagenet", env={"MSAD_JAX_DEBUG": "1"})
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_missing_config_file(tmp_path):
    proc = _run("-m", "msad_jax.main", "--config", "configs/nope.py", "--workdir", str(tmp_path))
    _assert_one_line_error(proc, "configs/nope.py not found")
