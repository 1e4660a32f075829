"""The main job end to end with a Vision Transformer: a tiny ViT trained on synthetic images."""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from msad_jax.checkpointing import RunCheckpoints
from msad_jax.detector import Detector
from msad_jax.models import build_backbone, init_variables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow


def _main(config, workdir, *overrides, env=None):
    return subprocess.run(
        [
            sys.executable, "-m", "msad_jax.main",
            "--config", os.path.join(ROOT, "configs", config),
            "--workdir", str(workdir), "--config.progress=False", *overrides,
        ],
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )  # fmt: skip


def test_tiny_vit_trains_evaluates_and_scores(tmp_path):
    workdir = tmp_path / "run"
    proc = _main(
        "smoke.py", workdir, "--config.backbone=vit_tiny", "--config.plots=False",
        "--config.epochs=1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((workdir / "report.json").read_text())
    assert report["backbone"] == "vit_tiny"
    assert [h["epoch"] for h in report["history"]] == [0, 1]
    assert 0.0 <= report["final"]["auroc"] <= 1.0
    assert RunCheckpoints(workdir / "checkpoints").latest_step() == 7

    # The default frozen parameters (patch embedding, tokens, block 0) kept their initial values.
    saved = RunCheckpoints(workdir / "checkpoints").restore_arrays()["params"]
    initial = init_variables(build_backbone("vit_tiny"), 32, seed=0)["params"]
    for name in ("patch_embed", "cls_token", "pos_embed"):
        for a, b in zip(jax.tree.leaves(saved[name]), jax.tree.leaves(initial[name]), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=name)
    for part in ("0", "1"):
        moved = not np.array_equal(
            saved["blocks"][part]["mlp"]["fc1"]["kernel"],
            initial["blocks"][part]["mlp"]["fc1"]["kernel"],
        )
        assert moved == (part == "1"), part

    # The detector written by the run reproduces the run's test scores.
    from msad_jax.train import load_data

    config = ml_collections.ConfigDict(json.loads((workdir / "run.json").read_text())["config"])
    data = load_data(config, 0)
    detector_file = np.load(workdir / "detector.npz")
    scores = Detector.load(workdir).score(data.test_images)
    np.testing.assert_allclose(scores, detector_file["test_scores"], rtol=1e-5, atol=1e-7)


def test_missing_dinov2_weights_offline_is_one_line(tmp_path):
    cache = tmp_path / "cache"
    proc = _main(
        "cifar10_dinov2.py", tmp_path / "run", "--config.dataset=synthetic",
        "--config.backbone=dinov2_vits14",
        env={"MSAD_JAX_OFFLINE": "1", "MSAD_JAX_CACHE": str(cache)},
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: Pretrained weights for dinov2_vits14 are not in the cache")
    assert "https://huggingface.co/facebook/dinov2-small/resolve/main/model.safetensors" in last
    assert str(cache / "facebook--dinov2-small--model.safetensors") in last
