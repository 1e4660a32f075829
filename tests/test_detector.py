"""Deploying a trained detector: the threshold's calibration, exported scorers, inference imports.

One tiny synthetic run (resnet_tiny, random init, one epoch) serves all tests.
"""

import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from msad_jax import calibration, train
from msad_jax.config import ConfigError, default_config
from msad_jax.detector import Detector

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(**changes):
    config = default_config()
    config.update(
        dataset="synthetic", synthetic_train=64, synthetic_test=8, backbone="resnet_tiny",
        pretrained=False, learning_rate=0.01, batch_size=32, epochs=1, eval_batch_size=64,
        progress=False, plots=False, checkpoint_every_steps=0,
    )  # fmt: skip
    config.update(changes)
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("deploy") / "run"
    report = train.train_and_evaluate(smoke_config(), str(workdir))
    return workdir, report


@pytest.fixture(scope="module")
def detector(run):
    return Detector.load(run[0])


def _python(*args, timeout=300):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip


def _assert_one_line_error(proc, *fragments):
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: "), lines[-1]
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])


def _leave_one_out(gallery, k):
    """NumPy oracle: each row's k nearest other rows, squared distances summed."""
    g = np.asarray(gallery, np.float64)
    d = ((g[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, :k].sum(1)


def _conformal(scores, fpr):
    return np.sort(scores)[math.ceil((len(scores) + 1) * (1 - fpr)) - 1]


# --------------------------------------------------------------------------------------------
# The threshold: set from normal images only, stored, reported.


def test_threshold_is_set_from_leave_one_out_scores_at_the_target_fpr(run, detector):
    workdir, report = run
    saved = np.load(workdir / "detector.npz")
    loo = _leave_one_out(saved["gallery"], 2)
    np.testing.assert_allclose(saved["calibration_scores"], loo, rtol=1e-5)
    assert str(saved["calibration"]) == "leave_one_out" and float(saved["target_fpr"]) == 0.05
    assert detector.threshold == pytest.approx(_conformal(loo, 0.05), rel=1e-5)
    labels, scores = saved["test_labels"], saved["test_scores"]
    stated = report["calibration"]
    assert stated["target_fpr"] == 0.05 and stated["calibration_images"] == 64
    assert stated["test_fpr"] == np.mean(scores[labels == 0] > detector.threshold)
    assert stated["test_recall"] == np.mean(scores[labels == 1] > detector.threshold)
    assert json.loads((workdir / "report.json").read_text())["calibration"] == stated
    assert "set for a false-positive rate of 5%" in (workdir / "report.md").read_text()


def test_another_rate_is_recomputed_from_the_stored_scores(run, detector):
    saved = np.load(run[0] / "detector.npz")
    strict = detector.with_fpr(0.02)
    assert strict.threshold == _conformal(saved["calibration_scores"], 0.02)
    assert strict.target_fpr == 0.02 and detector.target_fpr == 0.05  # the original unchanged
    assert strict.threshold >= detector.threshold
    images = train.load_data(smoke_config(), 0).test_images[:16]
    scores = detector.score(images)
    np.testing.assert_array_equal(strict.predict(images), scores > strict.threshold)
    assert Detector.load(run[0], fpr=0.02).threshold == strict.threshold
    with pytest.raises(calibration.CalibrationError, match="needs at least 99 .* has 64"):
        detector.with_fpr(0.01)


def test_holdout_calibration_scores_held_out_images_against_the_gallery(tmp_path):
    config = smoke_config(calibration_holdout=0.34, epochs=0)  # 22 of 64 images: enough for 5%
    report = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert report["calibration"]["method"] == "holdout"
    assert report["calibration"]["calibration_images"] == 22
    assert report["counts"]["train"] == 42
    detector = Detector.load(tmp_path / "run")
    assert len(detector.gallery) == 42 and detector.calibration == "holdout"
    images = train.load_data(config, 0).train_images
    kept, held = calibration.holdout_split(64, 0.34, config.seed)
    phi = detector.features(images[held]).astype(np.float64)
    gallery = detector.gallery.astype(np.float64)
    d = ((phi[:, None, :] - gallery[None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose(
        detector.calibration_scores, np.sort(d, axis=1)[:, :2].sum(1), rtol=1e-4
    )
    np.testing.assert_allclose(detector.features(images[kept]), detector.gallery, atol=1e-5)
    with pytest.raises(ConfigError, match="needs at least 19 held-out normal images"):
        train.train_and_evaluate(smoke_config(calibration_holdout=0.1), str(tmp_path / "few"))


def test_detector_files_of_earlier_versions_still_load(run, detector, tmp_path):
    import shutil

    workdir = tmp_path / "old"
    shutil.copytree(run[0], workdir)
    path = workdir / "detector.npz"
    with np.load(path) as saved:
        keep = ("gallery", "train_scores", "test_scores", "test_labels", "image_side", "knn_k")
        arrays = {k: saved[k] for k in (*keep, "checkpoint_step")}
    old_threshold = float(np.quantile(arrays["train_scores"], 0.95))
    arrays["threshold"] = np.asarray(old_threshold)
    np.savez(path, **arrays)  # an earlier version's file: no variables, no digest
    info = json.loads((workdir / "run.json").read_text())
    info["config"]["threshold_quantile"] = 0.95
    del info["config"]["threshold_fpr"], info["config"]["calibration_holdout"]
    (workdir / "run.json").write_text(json.dumps(info))
    old = Detector.load(workdir)  # parameters from the checkpoint named in the file
    assert old.threshold == old_threshold and old.target_fpr == pytest.approx(0.05)
    images = train.load_data(smoke_config(), 0).test_images[:8]
    np.testing.assert_allclose(old.score(images), detector.score(images), rtol=1e-6)
    assert old.with_fpr(0.05).threshold == detector.threshold
    shutil.rmtree(workdir / "checkpoints" / str(int(arrays["checkpoint_step"])))
    with pytest.raises(train.CheckpointError, match="which is gone"):
        Detector.load(workdir)


# --------------------------------------------------------------------------------------------
# Inference imports no training code.


def test_inference_modules_import_no_training_code():
    code = textwrap.dedent(
        """
        import sys
        import msad_jax.detector, msad_jax.export, msad_jax.score
        banned = ("msad_jax.train", "msad_jax.train_step", "msad_jax.checkpointing",
                  "msad_jax.optimizer", "msad_jax.plots", "matplotlib", "orbax", "optax")
        print([m for m in sys.modules if m.split(".")[0] in banned or m in banned])
        """
    )
    proc = _python("-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------
# Exported scorers score exactly like the detector, loaded with jax alone.

LOAD_AND_SCORE = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from jax import export

    folder, cases = sys.argv[1], np.load(sys.argv[2])
    with open(folder + "/scorer.jax_exported", "rb") as handle:
        scorer = export.deserialize(bytearray(handle.read()))
    threshold = json.load(open(folder + "/scorer.json"))["threshold"]
    out = {}
    for name in cases.files:
        scores = np.asarray(scorer.call(cases[name]))
        out[name] = scores
        out[name + "_flags"] = scores > threshold
    np.savez(sys.argv[3], **out)
    loaded = sorted({m.split(".")[0] for m in sys.modules})
    print(json.dumps([m for m in loaded if m in ("msad_jax", "flax", "orbax", "optax")]))
    """
)


def _image_cases():
    rng = np.random.default_rng(0)
    test = train.load_data(smoke_config(), 0).test_images
    return {
        "rgb_stored_size": test[:5],
        "rgb_odd_size": rng.integers(0, 256, (3, 37, 23, 3), np.uint8),
        "grey": rng.integers(0, 256, (2, 50, 41, 1), np.uint8),
        "rgba_wide": rng.integers(0, 256, (2, 29, 64, 4), np.uint8),
        "one_pixel": rng.integers(0, 256, (1, 1, 1, 3), np.uint8),
    }


def test_exported_scorer_scores_like_the_detector_in_a_fresh_process(run, detector, tmp_path):
    folder = tmp_path / "scorer"
    metadata = detector.export(folder)
    cases = _image_cases()
    np.savez(tmp_path / "cases.npz", **cases)
    proc = _python("-c", LOAD_AND_SCORE, str(folder), str(tmp_path / "cases.npz"),
                   str(tmp_path / "out.npz"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []  # jax and numpy only
    exported = np.load(tmp_path / "out.npz")
    for name, images in cases.items():
        want = detector.score(images if images.shape[-1] != 1 else images[..., 0])
        np.testing.assert_allclose(exported[name], want, rtol=1e-5, err_msg=name)
        np.testing.assert_array_equal(exported[name + "_flags"], want > detector.threshold)
    # Stored-size images also reproduce the run's own test scores.
    saved = np.load(run[0] / "detector.npz")
    np.testing.assert_allclose(exported["rgb_stored_size"], saved["test_scores"][:5], rtol=1e-5)
    blob = (folder / "scorer.jax_exported").read_bytes()
    assert metadata["scorer_sha256"] == hashlib.sha256(blob).hexdigest()
    assert metadata == json.loads((folder / "scorer.json").read_text())
    assert metadata["threshold"] == detector.threshold and metadata["platforms"] == ["cpu"]
    assert len(metadata["calibration_scores"]) == 64


def test_export_for_several_platforms_runs_on_cpu(detector, tmp_path):
    from jax import export

    metadata = detector.export(tmp_path / "multi", platforms=("cpu", "cuda", "tpu"))
    assert metadata["platforms"] == ["cpu", "cuda", "tpu"]
    blob = (tmp_path / "multi" / "scorer.jax_exported").read_bytes()
    scorer = export.deserialize(bytearray(blob))
    images = train.load_data(smoke_config(), 0).test_images[:3]
    got = np.asarray(scorer.call(images))
    np.testing.assert_allclose(got, detector.score(images), rtol=1e-5)


def _without_locations(text: str) -> str:
    """MLIR text without its ``loc(...)`` annotations (nested, with quoted names)."""
    out, i = [], 0
    while (start := text.find(" loc(", i)) >= 0:
        out.append(text[i:start])
        depth, j, quoted = 0, start + 1, False
        while True:
            char = text[j]
            if char == '"' and text[j - 1] != "\\":
                quoted = not quoted
            elif not quoted and char == "(":
                depth += 1
            elif not quoted and char == ")":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        i = j + 1
    return "".join(out) + text[i:]


def test_exported_program_is_the_one_without_the_cpu_lowering(detector, monkeypatch):
    """The CPU lowering (on by default when tracing on a CPU) stays out of exported programs."""
    from msad_jax import cpu_flags
    from msad_jax.export import export_scorer

    def program() -> str:  # the StableHLO text without its source locations
        text = export_scorer(detector, platforms=("cpu", "cuda", "tpu")).mlir_module()
        lines = [line for line in text.splitlines() if not line.startswith("#loc")]
        return _without_locations("\n".join(lines))

    default = program()
    monkeypatch.setenv(cpu_flags.ENV_VAR, "0")
    assert "stablehlo.convolution" in default and "loc(" not in default
    assert default == program()


def test_export_refuses_to_overwrite(detector, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    from msad_jax.export import ExportError

    with pytest.raises(ExportError, match="not empty"):
        detector.export(tmp_path / "taken")
    with pytest.raises(ExportError, match="Unknown platform"):
        detector.export(tmp_path / "new", platforms=("metal",))
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------------------------
# Command lines.


def test_export_command_writes_a_scorer_and_rejects_bad_input_in_one_line(run, tmp_path):
    workdir = str(run[0])
    helped = _python("-m", "msad_jax.export", "--help")
    assert helped.returncode == 0 and "--format" in helped.stdout + helped.stderr
    out = tmp_path / "out"
    done = _python("-m", "msad_jax.export", "--workdir", workdir, "--format", "stablehlo",
                   "--fpr", "0.1", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    metadata = json.loads((out / "scorer.json").read_text())
    assert metadata["target_fpr"] == 0.1
    assert metadata["threshold"] == Detector.load(workdir, fpr=0.1).threshold
    _assert_one_line_error(
        _python(
            "-m",
            "msad_jax.export",
            "--workdir",
            workdir,
            "--format",
            "savedmodel",
            str(tmp_path / "tf"),
        ),  # fmt: skip
        "--format=savedmodel",
        "--format=stablehlo",
    )
    _assert_one_line_error(
        _python("-m", "msad_jax.export", "--workdir", workdir, str(out)), str(out), "not empty"
    )
    _assert_one_line_error(
        _python("-m", "msad_jax.export", "--workdir", str(tmp_path / "none"), str(tmp_path / "x")),
        "holds no finished run",
    )


def test_score_command_takes_another_false_positive_rate(run, detector, tmp_path):
    from PIL import Image

    images = train.load_data(smoke_config(), 0).test_images[:6]
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    proc = _python("-m", "msad_jax.score", "--workdir", str(run[0]), "--fpr", "0.1",
                   str(tmp_path))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    loose = detector.with_fpr(0.1)
    labels = [line.split("\t")[2] for line in proc.stdout.strip().splitlines()]
    want = ["anomalous" if flag else "normal" for flag in loose.predict(images)]
    assert labels == want
    assert f"threshold {loose.threshold:.6f} (target false-positive rate 0.1)" in proc.stderr
    _assert_one_line_error(
        _python(
            "-m", "msad_jax.score", "--workdir", str(run[0]), "--fpr", "0.001", str(tmp_path)
        ),  # fmt: skip
        "needs at least 999",
        "has 64",
    )
