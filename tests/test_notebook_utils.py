"""msad_jax.notebook_utils: smoke mode, runtime info, image folders and threshold trade-offs."""

import json
import logging
import os
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest
from PIL import Image

from msad_jax import notebook_utils as nu
from msad_jax.config import ConfigError, default_config
from msad_jax.data import registry, synthetic


def test_smoke_mode_reads_the_environment_variable():
    assert nu.smoke_mode({}) is False
    assert nu.smoke_mode({nu.SMOKE_ENV_VAR: "1"}) is True
    assert nu.smoke_mode({nu.SMOKE_ENV_VAR: "0"}) is False
    assert nu.smoke_mode({nu.SMOKE_ENV_VAR: " 1 "}) is True
    with pytest.raises(ValueError, match="MSAD_JAX_NOTEBOOK_SMOKE='yes'"):
        nu.smoke_mode({nu.SMOKE_ENV_VAR: "yes"})


def test_smoke_config_is_a_validated_copy():
    config = default_config()
    config.normal_class = "3"
    config.threshold_quantile = 0.9
    smoke = nu.smoke_config(config, epochs=1)
    assert config.backbone == "resnet152" and config.epochs == 20  # the original is untouched
    for key, value in nu.SMOKE_SETTINGS.items():
        if key != "epochs":
            assert smoke[key] == value, key
    assert smoke.epochs == 1
    assert (smoke.normal_class, smoke.threshold_quantile) == ("3", 0.9)  # other keys kept
    with pytest.raises(ConfigError, match="data_dir"):
        nu.smoke_config(config, dataset="folder")


def test_runtime_info_matches_jax():
    info = nu.runtime_info()
    assert info.platform == jax.default_backend()
    assert info.local_device_count == len(jax.local_devices())
    assert info.device_count == jax.device_count()
    assert info.device_kind == jax.local_devices()[0].device_kind
    gpu = nu.RuntimeInfo("gpu", "Tesla T4", 1, 1, 1, True)
    assert gpu.describe().startswith("Colab runtime: 1 x Tesla T4")
    assert "CPU only" not in gpu.describe()
    assert "CPU only" in nu.RuntimeInfo("cpu", "cpu", 1, 1, 1, False).describe()
    unused = nu.RuntimeInfo("cpu", "cpu", 1, 1, 1, True, host_accelerator="gpu").describe()
    assert "has a GPU that JAX does not use" in unused and "jax[cuda12]" in unused
    assert info.host_accelerator in ("", "gpu", "tpu")


def test_show_library_logs_adds_one_handler():
    logger = logging.getLogger("msad_jax")
    saved = (logger.level, list(logger.handlers), logger.propagate)
    try:
        nu.show_library_logs()
        nu.show_library_logs()
        assert logger.level == logging.INFO
        assert len([h for h in logger.handlers if isinstance(h, logging.StreamHandler)]) == 1
    finally:
        logger.setLevel(saved[0])
        logger.handlers[:] = saved[1]
        logger.propagate = saved[2]


def _run_python(code, env_changes):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(env_changes)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_compilation_cache_is_enabled_unless_already_set(tmp_path):
    code = (
        "import json, jax\n"
        "from msad_jax import notebook_utils as nu\n"
        "used = nu.enable_compilation_cache(%r)\n"
        "print(json.dumps([used, jax.config.jax_compilation_cache_dir]))"
    )
    mine = str(tmp_path / "mine")
    assert _run_python(code % mine, {}) == [mine, mine]
    assert os.path.isdir(mine)
    preset = str(tmp_path / "preset")
    assert _run_python(code % mine, {"JAX_COMPILATION_CACHE_DIR": preset}) == [preset, preset]


def test_written_images_read_back_exactly(tmp_path):
    paths = nu.write_synthetic_images(tmp_path / "a", 3, 12, size=20, seed=7, prefix="g")
    expected = synthetic.grating_images(np.full(12, 3), 20, np.random.default_rng(7))
    assert [p.name for p in paths] == [f"g_{i:04d}.png" for i in range(12)]
    got = np.stack([np.asarray(Image.open(p)) for p in paths])
    np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValueError, match="uint8"):
        nu.write_images(tmp_path / "b", expected.astype(np.float32))
    with pytest.raises(ValueError, match="class_index=10"):
        nu.write_synthetic_images(tmp_path / "c", 10, 1)


def test_list_images_sorts_naturally_and_skips_other_files(tmp_path):
    for name in ("img10.png", "img2.JPG", "img1.png", ".hidden.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in nu.list_images(tmp_path)] == ["img1.png", "img2.JPG", "img10.png"]
    with pytest.raises(FileNotFoundError, match="not a folder"):
        nu.list_images(tmp_path / "missing")


def test_class_folders_load_as_a_folder_dataset(tmp_path):
    root = nu.write_class_folders(tmp_path / "d", (2, 7), train_per_class=5, test_per_class=3)
    names = [synthetic.CLASS_NAMES[2], synthetic.CLASS_NAMES[7]]
    assert registry.class_names("folder", path=root) == names
    data = registry.load_one_class("folder", 1, path=root)
    assert data.train_images.shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(data.test_labels, [1, 1, 1, 0, 0, 0])


def _source(tmp_path, normal=20, anomalous=4, new=3):
    src = tmp_path / "src"
    nu.write_synthetic_images(src / "normal", 0, normal, seed=0, prefix="n")
    if anomalous:
        nu.write_synthetic_images(src / "anomalous", 5, anomalous, seed=1, prefix="a")
    if new:
        nu.write_synthetic_images(src / "new", 0, new, seed=2, prefix="x")
    return src


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_prepare_splits_normal_images_and_loads_as_folder(tmp_path):
    src = _source(tmp_path)
    prepared = nu.prepare_image_folder(src, tmp_path / "work", test_fraction=0.25, seed=3)
    data_dir = prepared.data_dir
    assert prepared.layout == "normal+anomalous"
    assert prepared.counts == {"train_normal": 15, "test_normal": 5, "test_anomalous": 4, "new": 3}
    train, test = _names(data_dir / "train/normal"), _names(data_dir / "test/normal")
    assert not set(train) & set(test)
    assert sorted(train + test) == _names(src / "normal")
    assert _names(data_dir / "test/anomalous") == _names(src / "anomalous")
    assert [p.name for p in prepared.new_images] == ["x_0000.png", "x_0001.png", "x_0002.png"]
    data = registry.load_one_class("folder", 0, path=data_dir)
    assert len(data.train_images) == 15
    assert sorted(data.test_labels.tolist()) == [0] * 5 + [1] * 4
    # Deterministic in the seed, and a rerun replaces its own earlier output.
    again = nu.prepare_image_folder(src, tmp_path / "work", test_fraction=0.25, seed=3)
    assert _names(again.data_dir / "test/normal") == test
    other = nu.prepare_image_folder(src, tmp_path / "work2", test_fraction=0.25, seed=4)
    assert _names(other.data_dir / "test/normal") != test


def test_prepare_reads_a_zip_with_a_top_folder(tmp_path):
    src = _source(tmp_path, new=0)
    archive = tmp_path / "mine.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in src.rglob("*.png"):
            handle.write(path, "my_images/" + path.relative_to(src).as_posix())
    prepared = nu.prepare_image_folder(archive, tmp_path / "work")
    assert prepared.counts == {"train_normal": 16, "test_normal": 4, "test_anomalous": 4, "new": 0}
    assert prepared.new_images == []


def test_prepare_keeps_a_split_layout(tmp_path):
    root = nu.write_class_folders(tmp_path / "d", (0, 1), train_per_class=4, test_per_class=2)
    nu.write_synthetic_images(root / "new", 1, 2)
    prepared = nu.prepare_image_folder(root, tmp_path / "work")
    assert (prepared.data_dir, prepared.layout) == (root, "split")
    assert len(prepared.new_images) == 2
    assert not (tmp_path / "work").exists()


def test_prepare_rejects_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        nu.prepare_image_folder(tmp_path / "nothing", tmp_path / "w")
    no_anomalies = _source(tmp_path / "a", anomalous=0)
    with pytest.raises(ValueError, match="anomalous/ is missing or empty"):
        nu.prepare_image_folder(no_anomalies, tmp_path / "w")
    too_few = _source(tmp_path / "b", normal=4)
    with pytest.raises(ValueError, match="has 4 images"):
        nu.prepare_image_folder(too_few, tmp_path / "w")
    (tmp_path / "c" / "other").mkdir(parents=True)
    with pytest.raises(ValueError, match="neither normal/"):
        nu.prepare_image_folder(tmp_path / "c", tmp_path / "w")
    (tmp_path / "w2" / "dataset").mkdir(parents=True)
    with pytest.raises(ValueError, match="was not written here"):
        nu.prepare_image_folder(_source(tmp_path / "d"), tmp_path / "w2")
    with pytest.raises(ValueError, match="test_fraction"):
        nu.prepare_image_folder(_source(tmp_path / "e"), tmp_path / "w", test_fraction=1.0)


def _quantile(values, q):
    """Linear-interpolation quantile, by hand (numpy's default method)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def test_threshold_tradeoff_counts_what_each_threshold_flags():
    rng = np.random.default_rng(0)
    train = rng.gamma(2.0, 1.0, 200)
    test = np.concatenate([rng.gamma(2.0, 1.0, 50), rng.gamma(6.0, 1.0, 30)])
    labels = np.r_[np.zeros(50, int), np.ones(30, int)]
    new = rng.gamma(4.0, 1.0, 9)
    rows = nu.threshold_tradeoff(
        train, (0.5, 0.9, 0.99), test_scores=test, test_labels=labels, new_scores=new
    )
    for row, q in zip(rows, (0.5, 0.9, 0.99), strict=True):
        t = _quantile(train.tolist(), q)
        assert row["threshold"] == pytest.approx(t, rel=1e-12)
        assert row["train_flagged"] == sum(s > t for s in train) / 200
        assert row["test_false_alarms"] == sum(s > t for s in test[:50]) / 50
        assert row["test_detected"] == sum(s > t for s in test[50:]) / 30
        assert row["new_flagged"] == sum(s > t for s in new)
    assert rows[0]["train_flagged"] >= rows[1]["train_flagged"] >= rows[2]["train_flagged"]
    only_train = nu.threshold_tradeoff(train, (0.9,))
    assert set(only_train[0]) == {"quantile", "threshold", "train_flagged"}


def test_threshold_tradeoff_rejects_bad_input():
    with pytest.raises(ValueError, match="quantile 1.0"):
        nu.threshold_tradeoff(np.ones(5), (1.0,))
    with pytest.raises(ValueError, match="together"):
        nu.threshold_tradeoff(np.ones(5), (0.5,), test_scores=np.ones(3))
    with pytest.raises(ValueError, match="differ in shape"):
        nu.threshold_tradeoff(np.ones(5), (0.5,), test_scores=np.ones(3), test_labels=np.ones(2))
    with pytest.raises(ValueError, match="non-empty"):
        nu.threshold_tradeoff(np.ones(0), (0.5,))


def test_tradeoff_markdown_has_a_row_per_quantile():
    rows = nu.threshold_tradeoff(np.arange(10.0), (0.5, 0.9), new_scores=np.array([9.5, 1.0]))
    lines = nu.tradeoff_markdown(rows).strip().split("\n")
    assert len(lines) == 4
    assert lines[0] == "| quantile q | threshold | normal train flagged | new images flagged |"
    assert lines[3] == "| 0.900 | 8.1 | 10.0% | 1 |"
    with pytest.raises(ValueError, match="No rows"):
        nu.tradeoff_markdown([])
