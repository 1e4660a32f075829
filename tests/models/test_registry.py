"""Backbone registry and strict torchvision <-> Flax conversion."""

import jax
import numpy as np
import pytest
import torchvision

from msad_jax.models import (
    StateDictMismatchError,
    backbone_spec,
    build_backbone,
    from_torchvision,
    init_variables,
    list_backbones,
    to_torchvision,
    variable_shapes,
)


def _state_dict(name):
    model = getattr(torchvision.models, name)(weights=None)
    return {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def resnet18_state_dict():
    return _state_dict("resnet18")


@pytest.mark.parametrize("with_classifier", [True, False])
def test_round_trip_is_the_identity(resnet18_state_dict, with_classifier):
    state_dict = {
        k: v for k, v in resnet18_state_dict.items() if not k.endswith("num_batches_tracked")
    }
    if not with_classifier:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    back = to_torchvision(from_torchvision(state_dict, "resnet18"))
    assert back.keys() == state_dict.keys()
    for key, value in state_dict.items():
        assert back[key].dtype == value.dtype
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_layout_of_converted_variables(resnet18_state_dict):
    variables = from_torchvision(resnet18_state_dict, "resnet18")
    kernel = variables["params"]["layer2"]["0"]["downsample"]["0"]["kernel"]
    weight = resnet18_state_dict["layer2.0.downsample.0.weight"]
    np.testing.assert_array_equal(kernel, weight.transpose(2, 3, 1, 0))  # OIHW -> HWIO
    np.testing.assert_array_equal(
        variables["batch_stats"]["layer4"]["1"]["bn2"]["var"],
        resnet18_state_dict["layer4.1.bn2.running_var"],
    )
    np.testing.assert_array_equal(
        variables["params"]["fc"]["kernel"], resnet18_state_dict["fc.weight"].T
    )


def test_classifier_is_dropped_on_request(resnet18_state_dict):
    variables = from_torchvision(resnet18_state_dict, "resnet18", with_classifier=False)
    assert "fc" not in variables["params"]


def test_wrong_architecture_lists_every_problem():
    with pytest.raises(StateDictMismatchError) as info:
        from_torchvision(_state_dict("resnet34"), "resnet18")
    message = str(info.value)
    assert "unexpected keys (" in message and "layer1.2.conv1.weight" in message
    assert "\n" not in message


def test_missing_and_misshaped_keys_are_listed(resnet18_state_dict):
    broken = dict(resnet18_state_dict)
    del broken["layer3.1.bn1.running_mean"]
    broken["conv1.weight"] = np.zeros((64, 3, 5, 5), np.float32)
    with pytest.raises(StateDictMismatchError) as info:
        from_torchvision(broken, "resnet18")
    message = str(info.value)
    assert "missing keys (1): layer3.1.bn1.running_mean" in message
    assert "conv1.weight (64, 3, 5, 5) != expected (64, 3, 7, 7)" in message


def test_registry_names_and_defaults():
    assert {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152"} <= set(list_backbones())
    assert backbone_spec("resnet152").frozen == ("^conv1/", "^bn1/", "^layer1/", "^layer2/")
    assert backbone_spec("resnet18").frozen == ()
    big, small = backbone_spec("resnet152").preprocessing, backbone_spec("resnet18").preprocessing
    assert (big.resize, big.crop, big.method, big.size) == (256, 224, "bilinear", 224)
    assert (small.resize, small.crop, small.method, small.size) == (224, None, "bicubic", 224)
    assert backbone_spec("resnet152").weights.filename == "resnet152-394f9c45.pth"


def test_frozen_patterns_name_real_parameters():
    import re

    variables = variable_shapes(build_backbone("resnet152"), 32)
    top = set(variables["params"])
    for pattern in backbone_spec("resnet152").frozen:
        assert any(re.search(pattern, name + "/") for name in top), pattern


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ValueError, match="Unknown backbone 'resnet19'; choose one of .*resnet18"):
        build_backbone("resnet19")


def test_random_init_follows_torchvision_scheme():
    model = build_backbone("resnet18", num_classes=1000)
    variables = init_variables(model, 32, seed=3)
    shapes = variable_shapes(model, 32)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), variables) == jax.tree.map(
        lambda s: (s.shape, s.dtype), shapes
    )
    kernel = variables["params"]["layer3"]["0"]["conv2"]["kernel"]  # 3x3x256x256
    assert abs(kernel.std() / np.sqrt(2.0 / (3 * 3 * 256)) - 1) < 0.02
    assert np.all(variables["params"]["bn1"]["scale"] == 1)
    assert np.all(variables["batch_stats"]["bn1"]["var"] == 1)
    assert np.abs(variables["params"]["fc"]["kernel"]).max() <= 1 / np.sqrt(512)
    again = init_variables(model, 32, seed=3)
    np.testing.assert_array_equal(
        again["params"]["fc"]["kernel"], variables["params"]["fc"]["kernel"]
    )
    other = init_variables(model, 32, seed=4)
    assert not np.array_equal(other["params"]["fc"]["kernel"], variables["params"]["fc"]["kernel"])
