"""Parity of the Flax ResNets with torchvision (random weights, eval and train mode)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from msad_jax.models import build_backbone, from_torchvision, init_variables

SIZES = (224, 97, 33)  # 97 and 33 are odd: any padding or stride slip shows up there.


def _randomize_batch_norm(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm affine parameters and running statistics."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.weight.data = torch.rand(n, generator=gen) + 0.5
            module.bias.data = torch.randn(n, generator=gen) * 0.1
            module.running_mean = torch.randn(n, generator=gen) * 0.1
            module.running_var = torch.rand(n, generator=gen) * 1.5 + 0.5


def _torch_features_and_logits(model, x_nchw):
    trunk = torch.nn.Sequential(*list(model.children())[:-1])
    with torch.no_grad():
        x = torch.from_numpy(x_nchw)
        return trunk(x).flatten(1).numpy(), model(x).numpy()


def _relative_error(got, want):
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


@pytest.fixture(scope="module", params=["resnet18", "resnet50", "resnet152"])
def pair(request):
    torch.manual_seed(0)
    tmodel = getattr(torchvision.models, request.param)(weights=None).eval()
    _randomize_batch_norm(tmodel, seed=1)
    state_dict = {k: v.numpy() for k, v in tmodel.state_dict().items()}
    variables = from_torchvision(state_dict, request.param)
    fmodel = build_backbone(request.param, num_classes=1000)
    return request.param, tmodel, fmodel, variables


def test_eval_mode_matches_torchvision(pair):
    name, tmodel, fmodel, variables = pair
    forward = jax.jit(lambda v, x: fmodel.apply(v, x, with_logits=True))
    for size in SIZES:
        x = np.random.default_rng(size).normal(size=(2, 3, size, size)).astype(np.float32)
        want_features, want_logits = _torch_features_and_logits(tmodel, x)
        features, logits = forward(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
        assert features.shape == want_features.shape
        assert _relative_error(features, want_features) < 1e-5, (name, size)
        assert _relative_error(logits, want_logits) < 1e-5, (name, size)


def test_features_without_classifier_equal_the_classifier_models(pair):
    name, _, fmodel, variables = pair
    plain = build_backbone(name)
    trunk_variables = {
        "params": {k: v for k, v in variables["params"].items() if k != "fc"},
        "batch_stats": variables["batch_stats"],
    }
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 33, 33, 3)), jnp.float32)
    np.testing.assert_array_equal(
        plain.apply(trunk_variables, x), fmodel.apply(variables, x, with_logits=True)[0]
    )


def test_train_mode_batch_norm_matches_torchvision():
    torch.manual_seed(0)
    tmodel = torchvision.models.resnet18(weights=None)
    _randomize_batch_norm(tmodel, seed=2)
    variables = from_torchvision({k: v.numpy() for k, v in tmodel.state_dict().items()}, "resnet18")
    fmodel = build_backbone("resnet18", num_classes=1000)
    x = np.random.default_rng(3).normal(size=(4, 3, 64, 64)).astype(np.float32)
    tmodel.train()
    with torch.no_grad():
        want = tmodel(torch.from_numpy(x)).numpy()
    (_, logits), updates = fmodel.apply(
        variables,
        jnp.asarray(x.transpose(0, 2, 3, 1)),
        train=True,
        with_logits=True,
        mutable=["batch_stats"],
    )
    assert _relative_error(logits, want) < 1e-5
    # Running means follow torch's update rule (momentum 0.1). (Running variances differ by design:
    # torch stores the unbiased batch variance, Flax the biased one.)
    got_mean = np.asarray(updates["batch_stats"]["bn1"]["mean"])
    np.testing.assert_allclose(got_mean, tmodel.bn1.running_mean.numpy(), rtol=1e-4, atol=1e-6)
    unchanged = variables["batch_stats"]["bn1"]["mean"]
    assert not np.allclose(got_mean, unchanged)


def test_eval_mode_leaves_batch_stats_alone():
    model = build_backbone("resnet_tiny")
    variables = init_variables(model, 32)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    _, updates = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["batch_stats"]))(
        variables, x
    )
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"])


def test_bfloat16_compute_keeps_float32_parameters_and_stays_close():
    model32 = build_backbone("resnet18")
    model16 = build_backbone("resnet18", dtype=jnp.bfloat16)
    variables = init_variables(model32, 64)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    x = jax.random.normal(jax.random.key(1), (4, 64, 64, 3))
    f32 = jax.jit(model32.apply)(variables, x)
    f16 = jax.jit(model16.apply)(variables, x)
    assert f16.dtype == jnp.float32  # pooled in float32
    cosine = jnp.sum(f32 * f16, -1) / (
        jnp.linalg.norm(f32, axis=-1) * jnp.linalg.norm(f16, axis=-1)
    )
    assert float(cosine.min()) > 0.999
    assert _relative_error(f16, np.asarray(f32)) < 0.05


def test_feature_dimensions():
    for name, dim in (
        ("resnet18", 512),
        ("resnet34", 512),
        ("resnet50", 2048),
        ("resnet_tiny", 64),
    ):
        model = build_backbone(name)
        shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
        out = jax.eval_shape(model.apply, shapes, jnp.zeros((3, 32, 32, 3)))
        assert out.shape == (3, dim) == (3, model.feature_dim)


def test_wrong_input_layout_is_a_clear_error():
    model = build_backbone("resnet_tiny")
    with pytest.raises(ValueError, match="NHWC images with 3 channels"):
        model.init(jax.random.key(0), jnp.zeros((1, 3, 32, 32)))


def test_logits_need_a_classifier():
    model = build_backbone("resnet_tiny")
    with pytest.raises(ValueError, match="num_classes"):
        model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), with_logits=True)
