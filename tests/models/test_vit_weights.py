"""ViT / DINOv2 weights: strict conversion, reading files, downloading from a loopback "Hub"."""

import contextlib
import dataclasses
import hashlib
import http.server
import threading

import jax
import numpy as np
import pytest
import torch
import vit_oracles as oracles
from safetensors.numpy import save_file

from msad_jax.models import (
    PretrainedWeightsError,
    StateDictMismatchError,
    WeightsFile,
    convert_weights,
    load_pretrained,
    pretrained,
    vit_weights,
)
from msad_jax.models.weight_files import WeightFileError, load_state_dict

TINY = {"patch": 4, "dim": 32, "depth": 2, "heads": 2, "image": 32}  # the vit_tiny backbone


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("MSAD_JAX_CACHE", str(tmp_path / "default-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("MSAD_JAX_OFFLINE", raising=False)


@pytest.fixture(scope="module")
def hf_dinov2():
    pair = oracles.hf_pair("dinov2", **TINY, registers=4, seed=11)
    return pair, oracles.file_layout(pair.torch_model, pair.torch_model.state_dict())


@pytest.fixture(scope="module")
def timm_tiny():
    """A timm ViT shaped like the ``vit_tiny`` backbone (with its 10-class head)."""
    pair = oracles.timm_pair(**TINY, num_classes=10, seed=12)
    return pair, oracles.file_layout(pair.torch_model, pair.torch_model.state_dict())


def _assert_same(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


def _features_match(pair, variables):
    images = np.random.default_rng(0).standard_normal((2, 40, 40, 3)).astype(np.float32)
    with torch.no_grad():
        want = pair.features(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    got = jax.jit(pair.flax_model.apply)(variables, images)
    return oracles.max_relative_error(got, want) < 1e-5


# --------------------------------------------------------------------------------------------
# Files as the libraries write them.


def test_file_saved_by_transformers_converts(tmp_path, hf_dinov2):
    pair, _ = hf_dinov2
    pair.torch_model.save_pretrained(tmp_path)
    state = load_state_dict(tmp_path / "model.safetensors")
    assert "encoder.layer.1.attention.attention.value.weight" in state  # the Hub's key names
    assert "embeddings.mask_token" in state  # present, unused
    variables = vit_weights.convert_state_dict(state, pair.template(), "hf_dinov2")
    assert _features_match(pair, variables)


def test_timm_checkpoint_is_read_without_unpickling_code(tmp_path, timm_tiny):
    pair, state = timm_tiny
    torch.save(pair.torch_model.state_dict(), tmp_path / "weights.pth")
    loaded = load_state_dict(tmp_path / "weights.pth")
    assert loaded.keys() == state.keys()
    with_head = convert_weights(loaded, "vit_tiny")  # keeps the head the file has
    _assert_same(with_head, pair.variables())
    without = convert_weights(loaded, "vit_tiny", with_classifier=False)
    assert "head" not in without["params"]
    assert _features_match(pair, without)


def test_damaged_safetensors_file_is_one_line(tmp_path, timm_tiny):
    _, state = timm_tiny
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightFileError, match="not a readable safetensors file") as info:
        load_state_dict(path)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------
# Strictness.


def test_missing_unexpected_and_misshaped_keys_are_all_listed(hf_dinov2):
    pair, state = hf_dinov2
    broken = dict(state)
    del broken["encoder.layer.1.attention.attention.key.bias"]
    broken["encoder.layer.0.extra.weight"] = np.zeros((3,), np.float32)
    broken["embeddings.position_embeddings"] = np.zeros((1, 50, 32), np.float32)
    with pytest.raises(StateDictMismatchError) as info:
        vit_weights.convert_state_dict(broken, pair.template(), "hf_dinov2", model_name="tiny")
    message = str(info.value)
    assert "\n" not in message and "tiny (hf_dinov2 layout)" in message
    assert "missing keys (1): encoder.layer.1.attention.attention.key.bias" in message
    assert "unexpected keys (1): encoder.layer.0.extra.weight" in message
    assert "embeddings.position_embeddings (1, 50, 32) != expected (1, 65, 32)" in message


def test_weights_of_another_layout_are_refused(hf_dinov2, timm_tiny):
    pair, _ = hf_dinov2
    _, timm_state = timm_tiny
    with pytest.raises(StateDictMismatchError, match=r"missing keys \(\d+\): .*unexpected keys"):
        vit_weights.convert_state_dict(timm_state, pair.template(), "hf_dinov2")


def test_unused_keys_are_optional_but_nothing_else_is(hf_dinov2):
    pair, state = hf_dinov2
    without_mask = {k: v for k, v in state.items() if k != "embeddings.mask_token"}
    _assert_same(
        vit_weights.convert_state_dict(without_mask, pair.template(), "hf_dinov2"),
        vit_weights.convert_state_dict(state, pair.template(), "hf_dinov2"),
    )
    pooled = {**state, "pooler.dense.bias": np.zeros((32,), np.float32)}  # only ViTModel's
    with pytest.raises(StateDictMismatchError, match=r"unexpected keys \(1\): pooler.dense.bias"):
        vit_weights.convert_state_dict(pooled, pair.template(), "hf_dinov2")


def test_original_dinov2_checkpoint_layout():
    """``register_tokens``, an unused ``mask_token`` and a CLS entry in ``pos_embed``."""
    pair = oracles.timm_pair(
        **TINY, registers=4, layer_scale=True, no_embed_class=True, seed=13
    )  # timm folds the CLS position into cls_token; the original keeps them apart
    state = oracles.file_layout(pair.torch_model, pair.torch_model.state_dict())
    cls_pos = np.random.default_rng(0).standard_normal((1, 1, 32)).astype(np.float32)
    original = {k: v for k, v in state.items() if k not in ("reg_token", "pos_embed")}
    original |= {
        "register_tokens": state["reg_token"],
        "pos_embed": np.concatenate([cls_pos, state["pos_embed"]], axis=1),
        "cls_token": state["cls_token"] - cls_pos,
        "mask_token": np.zeros((1, 32), np.float32),
    }
    twin = dataclasses.replace(
        pair, flax_model=pair.flax_model.clone(class_pos_embed=True), layout="dinov2"
    )
    variables = vit_weights.convert_state_dict(original, twin.template(), "dinov2")
    assert _features_match(twin, variables)


def test_unknown_layout_and_missing_classifier_are_named(hf_dinov2):
    pair, state = hf_dinov2
    with pytest.raises(ValueError, match="Unknown weights layout 'onnx'"):
        vit_weights.convert_state_dict(state, pair.template(), "onnx")
    with pytest.raises(ValueError, match="have no classifier"):
        convert_weights({}, "dinov2_vits14", with_classifier=True)


# --------------------------------------------------------------------------------------------
# Download: a loopback server that answers like the Hugging Face Hub (a redirect to the file's
# storage that declares the file's sha256 in X-Linked-Etag).


@contextlib.contextmanager
def _hub(body: bytes, declared: str):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 -- the http.server API
            if self.path == "/org/repo/resolve/main/model.safetensors":
                self.send_response(302)
                self.send_header("Location", "/storage/blob")
                self.send_header("X-Linked-Etag", f'"{declared}"')
                self.end_headers()
            elif self.path == "/storage/blob":
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/org/repo/resolve/main/model.safetensors"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture()
def hub_file(tmp_path, timm_tiny):
    pair, state = timm_tiny
    path = tmp_path / "served.safetensors"
    save_file(state, str(path))
    return path.read_bytes(), pair.variables()


def _registry(url):
    return {"vit_tiny": WeightsFile("org--repo--model.safetensors", url)}


def test_download_verifies_the_declared_sha256_and_rechecks_the_cache(tmp_path, hub_file):
    body, variables = hub_file
    digest = hashlib.sha256(body).hexdigest()
    cache = tmp_path / "cache"
    with _hub(body, digest) as url:
        loaded = load_pretrained(
            "vit_tiny", cache, with_classifier=True, registry=_registry(url), offline=False
        )
    _assert_same(loaded, variables)
    assert (cache / "org--repo--model.safetensors").read_bytes() == body
    assert (cache / "org--repo--model.safetensors.sha256").read_text().strip() == digest
    # Offline from now on: the cached file is used, and checked again against the digest.
    again = load_pretrained("vit_tiny", cache, registry=_registry(url), offline=True)
    assert "head" not in again["params"]
    damaged = bytearray(body)
    damaged[-1] ^= 1
    (cache / "org--repo--model.safetensors").write_bytes(bytes(damaged))
    with pytest.raises(PretrainedWeightsError, match="sha256 .* delete it"):
        load_pretrained("vit_tiny", cache, registry=_registry(url), offline=True)


def test_download_that_does_not_match_the_declared_sha256_is_discarded(tmp_path, hub_file):
    body, _ = hub_file
    cache = tmp_path / "cache"
    with _hub(body, "0" * 64) as url, pytest.raises(PretrainedWeightsError, match="sha256"):
        load_pretrained("vit_tiny", cache, registry=_registry(url), offline=False)
    assert not list(cache.iterdir())


def test_hub_addresses_and_the_offline_message(tmp_path):
    weights = pretrained.hub_weights("facebook/dinov2-small")
    assert weights.filename == "facebook--dinov2-small--model.safetensors"
    url = "https://huggingface.co/facebook/dinov2-small/resolve/main/model.safetensors"
    assert weights.url == url
    with pytest.raises(PretrainedWeightsError) as info:
        load_pretrained("dinov2_vits14", tmp_path / "cache", offline=True)
    message = str(info.value)
    assert "\n" not in message
    assert url in message
    assert str(tmp_path / "cache" / "facebook--dinov2-small--model.safetensors") in message
