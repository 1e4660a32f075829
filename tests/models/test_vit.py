"""ViT / DINOv2 against timm and transformers on random weights; resampling; dtypes; registry.

Parity: features, input gradients and parameter gradients of ``sum(features * r)`` within 1e-5
of the oracle, relative to each tensor's largest entry (float32), at the native resolution (input
grid = stored position grid) and at other resolutions (resampled position embeddings).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import vit_oracles as oracles

from msad_jax.models import (
    backbone_spec,
    build_backbone,
    init_variables,
    list_backbones,
    variable_shapes,
    vit,
    vit_weights,
)
from msad_jax.optimizer import trainable_mask

RTOL = 1e-5


def _assert_parity(errors):
    assert max(errors.values()) < RTOL, errors


# --------------------------------------------------------------------------------------------
# Position-embedding resampling against torch.nn.functional.interpolate itself.


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize(("grid", "out"), [(37, 16), (14, 10), (14, 20), (8, 5), (8, 11), (4, 1)])
def test_resampling_matches_torch_interpolate(antialias, grid, out):
    x = np.random.default_rng(grid * out).standard_normal((1, 3, grid, grid)).astype(np.float32)
    want = F.interpolate(
        torch.from_numpy(x), size=(out, out), mode="bicubic", align_corners=False,
        antialias=antialias,
    ).numpy()  # fmt: skip
    got = vit.resample_grid(jnp.asarray(x[0].transpose(1, 2, 0)), (out, out), antialias=antialias)
    assert oracles.max_relative_error(np.asarray(got).transpose(2, 0, 1), want[0]) < RTOL


@pytest.mark.parametrize(("grid", "out"), [(37, 16), (37, 40), (14, 10)])
def test_offset_resampling_matches_torch_scale_factor(grid, out):
    """The original DINOv2 code: ``scale_factor=(out + 0.1) / grid``, plain bicubic."""
    x = np.random.default_rng(out).standard_normal((1, 2, grid, grid)).astype(np.float32)
    factor = (out + 0.1) / grid
    want = F.interpolate(
        torch.from_numpy(x), scale_factor=(factor, factor), mode="bicubic", align_corners=False
    ).numpy()
    matrix = vit.resample_matrix(grid, out, antialias=False, offset=0.1)
    got = np.einsum("ah,bw,nchw->ncab", matrix, matrix, x)
    assert oracles.max_relative_error(got, want) < RTOL
    assert not np.allclose(matrix, vit.resample_matrix(grid, out, antialias=False), atol=1e-4)


def test_antialias_with_offset_is_refused():
    with pytest.raises(ValueError, match="plain bicubic only"):
        vit.resample_matrix(14, 10, antialias=True, offset=0.1)


# --------------------------------------------------------------------------------------------
# Tiny configurations: every variant of the architecture, several resolutions.

TINY = {"patch": 4, "dim": 32, "depth": 2, "heads": 2, "image": 32}
# 32 px: native (8 x 8 grid); 44: upsampled (11 x 11); 24: downsampled (6 x 6); 26: downsampled
# with 2 px dropped (timm refuses sizes that are not multiples of the patch; the others crop).


@pytest.mark.parametrize(
    ("make", "sizes"),
    [
        pytest.param(lambda: oracles.timm_pair(**TINY), (32, 44), id="timm-vit"),
        pytest.param(
            lambda: oracles.timm_pair(
                **TINY, registers=4, layer_scale=True, no_embed_class=True, seed=1
            ),
            (32, 24),
            id="timm-dinov2-reg",
        ),
        pytest.param(lambda: oracles.hf_pair("vit", **TINY, seed=2), (32, 26), id="hf-vit"),
        pytest.param(lambda: oracles.hf_pair("dinov2", **TINY, seed=3), (32, 26), id="hf-dinov2"),
        pytest.param(
            lambda: oracles.hf_pair("dinov2", **TINY, registers=4, seed=4),
            (32, 44),
            id="hf-dinov2-reg",
        ),
        pytest.param(
            lambda: oracles.hf_pair("dinov2", **TINY, registers=2, pooling="cls_mean", seed=5),
            (24,),
            id="hf-dinov2-reg-cls-mean",
        ),
    ],
)
def test_tiny_parity_at_native_and_other_resolutions(make, sizes):
    pair = make()
    for size in sizes:
        # Quicker XLA settings except once: the native timm ViT compiles as in training.
        quick = not (size == 32 and pair.layout == "timm" and not pair.flax_model.layer_scale)
        errors = oracles.compare(pair, size, batch=2, seed=size, quick_compile=quick)
        assert max(errors.values()) < RTOL, (size, errors)


def test_classifier_logits_match_timm():
    pair = oracles.timm_pair(**TINY, num_classes=10, seed=6)
    images = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        want = pair.torch_model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    _, logits = pair.flax_model.apply(pair.variables(), images, with_logits=True)
    assert oracles.max_relative_error(logits, want) < RTOL


# --------------------------------------------------------------------------------------------
# Real sizes (batch 1). DINOv2-S/14 as published stores a 37 x 37 position grid (518 px) and is
# used at 224 px (a resampled 16 x 16 grid); its native path (no resampling) is checked on the
# same network with a 16 x 16 grid (Hugging Face's default image_size=224), which costs a fifth
# of a 518 px pass. ViT-B/16: 224 px native, 160 px resampled.

DINOV2_S = {"patch": 14, "dim": 384, "depth": 12, "heads": 6, "image": 518}
VIT_B = {"patch": 16, "dim": 768, "depth": 12, "heads": 12, "image": 224}


@pytest.mark.slow
@pytest.mark.parametrize(("stored", "size"), [(518, 224), (224, 224)])
def test_dinov2_small_parity_with_transformers(stored, size):
    pair = oracles.hf_pair("dinov2", **{**DINOV2_S, "image": stored})
    _assert_parity(oracles.compare(pair, size, batch=1, quick_compile=True))


@pytest.mark.slow
def test_dinov2_small_with_registers_parity_with_transformers():
    pair = oracles.hf_pair("dinov2", **DINOV2_S, registers=4, seed=7)
    _assert_parity(oracles.compare(pair, 224, batch=1, quick_compile=True))


@pytest.fixture(scope="module")
def vit_b():
    return oracles.timm_pair(**VIT_B)


@pytest.mark.slow
@pytest.mark.parametrize("size", [224, 160])
def test_vit_base_parity_with_timm(vit_b, size):
    _assert_parity(oracles.compare(vit_b, size, batch=1, quick_compile=True))


def test_registry_variants_have_the_reference_shapes():
    """Every key and shape of the named variants is that of the timm / transformers model."""
    import timm
    import transformers

    with torch.device("meta"):  # shapes only, no initialisation
        references = {
            "vit_small_patch16_224": timm.create_model("vit_small_patch16_224"),
            "vit_base_patch16_224": timm.create_model("vit_base_patch16_224"),
            "dinov2_vits14": transformers.Dinov2Model(
                transformers.Dinov2Config(hidden_size=384, num_attention_heads=6, image_size=518)
            ),
            "dinov2_vitl14_reg": transformers.Dinov2WithRegistersModel(
                transformers.Dinov2WithRegistersConfig(
                    hidden_size=1024,
                    num_hidden_layers=24,
                    num_attention_heads=16,
                    patch_size=14,
                    image_size=518,
                    num_register_tokens=4,
                )
            ),
        }
    for name, model in references.items():
        spec = backbone_spec(name)
        state = oracles.file_layout(model, model.state_dict())
        got = {k: tuple(v.shape) for k, v in state.items() if k != "embeddings.mask_token"}
        template = variable_shapes(build_backbone(name, num_classes=spec.num_classes), 224)
        assert got == vit_weights.expected_shapes(template, spec.layout), name


# --------------------------------------------------------------------------------------------
# Compute dtype, registry entries, errors.


def test_bfloat16_compute_stays_close_to_float32():
    """bfloat16 matrix products: features within 3% (relative to their scale) of float32."""
    model32 = build_backbone("vit_tiny")
    model16 = build_backbone("vit_tiny", dtype=jnp.bfloat16)
    variables = init_variables(model32, 32, seed=0)
    images = jnp.asarray(np.random.default_rng(1).standard_normal((4, 32, 32, 3)), jnp.float32)
    f32 = np.asarray(jax.jit(model32.apply)(variables, images))
    f16 = jax.jit(model16.apply)(variables, images)
    assert f16.dtype == jnp.float32
    error = oracles.max_relative_error(f16, f32)
    assert 0 < error < 3e-2  # not bit-identical: the products did run in bfloat16
    grads = jax.jit(jax.grad(lambda p: jnp.sum(model16.apply({"params": p}, images) ** 2)))(
        variables["params"]
    )
    assert all(g.dtype == jnp.float32 and np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_registry_entries():
    names = set(list_backbones())
    vits = {"vit_small_patch16_224", "vit_base_patch16_224", "vit_tiny"}
    dinos = {f"dinov2_vit{s}14{r}" for s in "sbl" for r in ("", "_reg")}
    assert vits | dinos <= names
    dino, timm_vit = backbone_spec("dinov2_vits14"), backbone_spec("vit_base_patch16_224")
    p = dino.preprocessing
    assert (p.resize, p.crop, p.method, p.size % 14) == (256, 224, "bicubic", 0)
    p = timm_vit.preprocessing
    assert (p.resize, p.crop, p.method, p.mean) == (248, 224, "bicubic", (0.5, 0.5, 0.5))
    assert dino.weights.url == (
        "https://huggingface.co/facebook/dinov2-small/resolve/main/model.safetensors"
    )
    assert backbone_spec("dinov2_vitl14_reg").weights.url.startswith(
        "https://huggingface.co/facebook/dinov2-with-registers-large/"
    )
    assert dino.layout == "hf_dinov2" and timm_vit.layout == "timm"
    assert build_backbone("dinov2_vitb14").feature_dim == 768
    assert build_backbone("dinov2_vitb14", pooling="cls_mean").feature_dim == 1536
    assert vit.VIT_VARIANTS["dinov2_vits14"].native_size == 518


@pytest.mark.parametrize("name", ["vit_base_patch16_224", "dinov2_vitl14_reg", "vit_tiny"])
def test_default_frozen_patterns(name):
    """Patch embedding, tokens and the first half of the blocks; everything else trains."""
    spec = backbone_spec(name)
    params = variable_shapes(build_backbone(name), spec.preprocessing.size)["params"]
    mask = trainable_mask(params, spec.frozen)  # raises if a pattern matches nothing
    flat = {"/".join(k.key for k in path): m for path, m in jax.tree.leaves_with_path(mask)}
    depth = vit.VIT_VARIANTS[name].kwargs["depth"]
    for path, trainable in flat.items():
        block = re.match(r"blocks/(\d+)/", path)
        frozen = not path.startswith(("blocks/", "norm/")) or (
            block is not None and int(block.group(1)) < depth // 2
        )
        assert trainable != frozen, path


def test_random_init_gives_working_layer_scale():
    variables = init_variables(build_backbone("dinov2_vits14"), 224, seed=0)
    params = variables["params"]
    np.testing.assert_array_equal(params["blocks"]["0"]["ls1"]["gamma"], 1.0)
    assert 0.015 < params["pos_embed"].std() < 0.025
    assert params["pos_embed"].shape == (1, 1 + 37 * 37, 384)


@pytest.mark.parametrize(
    ("shape", "message"),
    [((2, 32, 32, 1), "3 channels"), ((2, 3, 3, 3), "smaller than one 4x4 patch")],
)
def test_bad_images_give_one_line(shape, message):
    model = build_backbone("vit_tiny")
    with pytest.raises(ValueError, match=message) as info:
        model.init(jax.random.key(0), jnp.zeros(shape))
    assert "\n" not in str(info.value)
