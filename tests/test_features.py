import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from multidevice import run_on_devices
from test_train_step import IMAGE, TinyNet, tiny_variables

from msad_jax.features import (
    center_from_sum,
    extract_features,
    extract_features_and_center,
    feature_step,
    make_feature_extractor,
    masked_feature_sum,
)
from msad_jax.train_step import replicate_state

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def preprocess(images):
    return images.astype(jnp.float32) / 255.0 - 0.5


def make_images(seed, n):
    return np.random.default_rng(seed).integers(0, 256, (n, IMAGE, IMAGE, 3), dtype=np.uint8)


def to_batches(images, n_devices, b):
    """Host-pipeline layout: [n_devices, b] per batch, last batch padded (mask False)."""
    per_batch = n_devices * b
    batches = []
    for start in range(0, len(images), per_batch):
        chunk = images[start : start + per_batch]
        mask = np.zeros(per_batch, bool)
        mask[: len(chunk)] = True
        padded = np.zeros((per_batch, *images.shape[1:]), images.dtype)
        padded[: len(chunk)] = chunk
        padded[len(chunk) :] = 77  # padding content must not matter
        batches.append(
            {
                "image": padded.reshape(n_devices, b, *images.shape[1:]),
                "mask": mask.reshape(n_devices, b),
                "label": np.zeros((n_devices, b), np.int32),  # extra keys are ignored
            }
        )
    return batches


def reference_phi(variables, images):
    """float64 NumPy normalisation of the float32 features of an independent forward."""
    feats = jax.jit(lambda v, x: TinyNet().apply(v, preprocess(x), train=False))(variables, images)
    feats = np.asarray(feats, np.float64)
    return feats / np.linalg.norm(feats, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def setup():
    variables = tiny_variables(11)
    images = make_images(0, 23)  # 23 = 5 batches of 5, the last one padded
    extractor = make_feature_extractor(TinyNet(), preprocess)
    return variables, images, extractor, replicate_state(variables)


def test_extract_features_in_input_order_with_padding_dropped(setup):
    variables, images, extractor, replicated = setup
    got = extract_features(extractor, replicated, to_batches(images, 1, 5), group_size=2)
    want = reference_phi(variables, images)
    assert got.shape == (23, 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_center_is_the_mean_of_normalised_features(setup):
    variables, images, extractor, replicated = setup
    phi = reference_phi(variables, images)
    _, center = extract_features_and_center(extractor, replicated, to_batches(images, 1, 5))
    np.testing.assert_allclose(center, phi.mean(axis=0), rtol=0, atol=1e-6)
    assert np.linalg.norm(center) < 1.0  # not re-normalised unless asked
    _, unit = extract_features_and_center(
        extractor, replicated, to_batches(images, 1, 5), normalize=True
    )
    mean = phi.mean(axis=0)
    np.testing.assert_allclose(unit, mean / np.linalg.norm(mean), rtol=0, atol=1e-6)
    feats, center2 = extract_features_and_center(
        extractor, replicated, to_batches(images, 1, 5), group_size=100
    )
    np.testing.assert_allclose(feats, phi, atol=1e-6)
    np.testing.assert_array_equal(center2, center)


def test_masked_feature_sum_and_center_from_sum():
    phi = np.arange(12, dtype=np.float32).reshape(4, 3)
    total, count = masked_feature_sum(phi, np.array([1, 0, 1, 0], bool))
    np.testing.assert_array_equal(total, phi[0] + phi[2])
    assert int(count) == 2
    np.testing.assert_allclose(center_from_sum(np.array([2.0, 0.0]), 4), [0.5, 0.0])
    np.testing.assert_allclose(center_from_sum(np.array([3.0, 4.0]), 2, normalize=True), [0.6, 0.8])
    with pytest.raises(ValueError, match="no valid"):
        center_from_sum(np.zeros(3), 0)


def test_bad_batches_raise_clear_errors(setup):
    _, images, extractor, replicated = setup
    with pytest.raises(ValueError, match="leading device axis"):
        extract_features(extractor, replicated, [{"image": images[:4], "mask": np.ones(4, bool)}])
    with pytest.raises(ValueError, match="needs 'image' and 'mask'"):
        extract_features(extractor, replicated, [{"image": images[None, :4]}])
    with pytest.raises(ValueError, match="no batches"):
        extract_features_and_center(extractor, replicated, [])
    all_padding = to_batches(images[:5], 1, 5)
    all_padding[0]["mask"][:] = False
    with pytest.raises(ValueError, match="no valid"):
        extract_features_and_center(extractor, replicated, all_padding)


MULTI_DEVICE_SOURCE = """
import json, sys
sys.path.insert(0, {tests_dir!r})
import jax, numpy as np
from test_features import make_images, preprocess, reference_phi, to_batches
from test_train_step import TinyNet, tiny_variables
from msad_jax.features import extract_features_and_center, make_feature_extractor
from msad_jax.train_step import replicate_state

n_dev = jax.local_device_count()
variables = tiny_variables(11)
images = make_images(1, 37)  # 3 batches of 8 x 2; the last has 11 valid, 5 padded
batches = to_batches(images, n_dev, 2)
batches[1]["mask"][3, 1] = False  # padding inside a batch too
keep = np.concatenate([b["mask"].reshape(-1) for b in batches])[: len(images)]
extractor = make_feature_extractor(TinyNet(), preprocess)
feats, center = extract_features_and_center(extractor, replicate_state(variables), batches,
                                            group_size=2)
phi = reference_phi(variables, images)[keep]
print(json.dumps(dict(
    n_dev=n_dev, n=len(feats), n_expected=int(keep.sum()),
    feat_err=float(np.max(np.abs(feats - phi))),
    center_err=float(np.max(np.abs(center - phi.mean(axis=0)))),
)))
"""


def test_eight_devices_center_and_features_equal_single_device():
    r = run_on_devices(MULTI_DEVICE_SOURCE.format(tests_dir=TESTS_DIR), devices=8)
    assert r["n_dev"] == 8
    assert r["n"] == r["n_expected"] == 36
    assert r["feat_err"] < 1e-6
    assert r["center_err"] < 1e-6


def test_feature_step_without_axis_matches_pmapped(setup):
    variables, images, extractor, replicated = setup
    batch = to_batches(images[:5], 1, 5)[0]
    plain = jax.jit(feature_step(TinyNet(), preprocess, axis_name=None))(
        variables, {"image": batch["image"][0], "mask": batch["mask"][0]}
    )
    mapped = extractor(replicated, {"image": batch["image"], "mask": batch["mask"]})
    np.testing.assert_allclose(mapped["phi"][0], plain["phi"], atol=1e-6)
    np.testing.assert_allclose(mapped["sum"][0], plain["sum"], atol=1e-6)
    assert int(mapped["count"][0]) == int(plain["count"]) == 5
