"""Pretrained weights: cache, download (from local file URLs), verification, offline messages."""

import hashlib
import time

import jax
import numpy as np
import pytest
import torch

from msad_jax.models import (
    PretrainedWeightsError,
    WeightsFile,
    build_backbone,
    init_variables,
    load_pretrained,
    to_torchvision,
)


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path, monkeypatch):
    """No real cache or torch hub folder leaks into these tests."""
    monkeypatch.setenv("MSAD_JAX_CACHE", str(tmp_path / "default-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("MSAD_JAX_OFFLINE", raising=False)


@pytest.fixture()
def tiny_weights(tmp_path):
    """A torch-saved resnet_tiny checkpoint named torch-hub style, and the variables inside."""
    model = build_backbone("resnet_tiny", num_classes=10)
    variables = jax.tree.map(np.asarray, init_variables(model, 32, seed=7))
    source = tmp_path / "server" / "tmp.pth"
    source.parent.mkdir()
    torch.save({k: torch.from_numpy(v) for k, v in to_torchvision(variables).items()}, source)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    named = source.with_name(f"resnet_tiny-{digest[:8]}.pth")
    source.rename(named)
    return named, digest[:8], variables


def _registry(path, prefix, url=True):
    return {
        "resnet_tiny": WeightsFile(path.name, path.as_uri() if url else None, sha256_prefix=prefix)
    }


def _assert_same(got, want):
    flat_got, flat_want = jax.tree.leaves_with_path(got), jax.tree.leaves_with_path(want)
    assert [p for p, _ in flat_got] == [p for p, _ in flat_want]
    for (path, a), (_, b) in zip(flat_got, flat_want, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=str(path))


def test_offline_with_empty_cache_fails_fast_with_one_sentence(tmp_path):
    start = time.monotonic()
    with pytest.raises(PretrainedWeightsError) as info:
        load_pretrained("resnet152", cache_dir=tmp_path / "cache", offline=True)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "\n" not in message
    assert "https://download.pytorch.org/models/resnet152-394f9c45.pth" in message
    assert str(tmp_path / "cache" / "resnet152-394f9c45.pth") in message


def test_offline_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("MSAD_JAX_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsError, match="offline"):
        load_pretrained("resnet18")


def test_download_from_url_then_verify_convert_and_cache(tmp_path, tiny_weights):
    path, prefix, variables = tiny_weights
    cache = tmp_path / "cache"
    loaded = load_pretrained(
        "resnet_tiny", cache, with_classifier=True, registry=_registry(path, prefix), offline=False
    )
    _assert_same(loaded, variables)
    assert (cache / path.name).read_bytes() == path.read_bytes()
    converted = cache / f"{path.stem}.classifier.npz"
    assert converted.is_file()
    features_only = load_pretrained("resnet_tiny", cache, registry=_registry(path, prefix))
    assert "fc" not in features_only["params"]
    _assert_same(features_only["batch_stats"], variables["batch_stats"])


def test_file_placed_in_the_cache_loads_offline(tmp_path, tiny_weights):
    path, prefix, variables = tiny_weights
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / path.name).write_bytes(path.read_bytes())
    registry = _registry(path, prefix, url=False)
    loaded = load_pretrained(
        "resnet_tiny", cache, with_classifier=True, registry=registry, offline=True
    )
    _assert_same(loaded, variables)


def test_torch_hub_cache_is_reused(tmp_path, tiny_weights, monkeypatch):
    path, prefix, variables = tiny_weights
    hub = tmp_path / "torch-home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / path.name).write_bytes(path.read_bytes())
    loaded = load_pretrained(
        "resnet_tiny",
        tmp_path / "cache",
        with_classifier=True,
        registry=_registry(path, prefix),
        offline=True,
    )
    _assert_same(loaded, variables)


def test_damaged_conversion_cache_is_rebuilt(tmp_path, tiny_weights):
    path, prefix, variables = tiny_weights
    cache = tmp_path / "cache"
    registry = _registry(path, prefix)
    load_pretrained("resnet_tiny", cache, with_classifier=True, registry=registry)
    converted = cache / f"{path.stem}.classifier.npz"
    converted.write_bytes(b"not an npz")
    loaded = load_pretrained("resnet_tiny", cache, with_classifier=True, registry=registry)
    _assert_same(loaded, variables)


def test_hash_mismatch_is_refused(tmp_path, tiny_weights):
    path, _, _ = tiny_weights
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / path.name).write_bytes(path.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(PretrainedWeightsError, match="sha256 .* delete it"):
        load_pretrained("resnet_tiny", cache, registry=_registry(path, "deadbeef"), offline=True)


def test_failed_download_says_where_to_put_the_file(tmp_path, tiny_weights):
    path, prefix, _ = tiny_weights
    registry = {"resnet_tiny": WeightsFile(path.name, (tmp_path / "nowhere.pth").as_uri(), prefix)}
    with pytest.raises(PretrainedWeightsError) as info:
        load_pretrained("resnet_tiny", tmp_path / "cache", registry=registry, offline=False)
    assert f"put it at {tmp_path / 'cache' / path.name}" in str(info.value)
    assert not list((tmp_path / "cache").glob("*.part"))


def test_backbone_without_weights_is_a_clear_error():
    with pytest.raises(PretrainedWeightsError, match="no pretrained weights"):
        load_pretrained("resnet_tiny", offline=True)
