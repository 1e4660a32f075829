"""MoCo-v2 augmentation: sampling distribution, each operation vs torchvision/scipy, composition.

Oracles: torchvision's functional ops (tensor and PIL), ``RandomResizedCrop.get_params``,
``scipy.ndimage.gaussian_filter`` and binomial statistics. Small images keep it fast on CPU.
"""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from scipy import ndimage

from msad_jax.data import augment as A
from msad_jax.data.transforms import Preprocessing

PREP = Preprocessing(resize=48, crop=None, method="bilinear")  # output side 48 for speed
N_DRAWS = 20000


def smooth_image(seed: int, height: int, width: int) -> np.ndarray:
    """A colourful uint8 image with structure at several scales."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height // 4 + 2, width // 4 + 2, 3), dtype=np.uint8)
    up = np.asarray(Image.fromarray(base).resize((width, height), Image.BICUBIC), np.int16)
    noise = rng.integers(-25, 26, up.shape)
    return np.clip(up + noise, 0, 255).astype(np.uint8)


@functools.cache
def _jitted_augment(prep):
    return jax.jit(functools.partial(A.train_augment, prep=prep))


@functools.cache
def _params(height: int, width: int, n: int = N_DRAWS, seed: int = 0):
    images = jnp.zeros((n, height, width, 3), jnp.uint8)
    params = jax.jit(A.sample_batch_params)(jax.random.key(seed), images)
    return jax.tree_util.tree_map(np.asarray, params)


def assert_rate(flags: np.ndarray, p: float, name: str) -> None:
    n = flags.size
    sd = math.sqrt(p * (1 - p) / n)
    rate = float(flags.mean())
    assert abs(rate - p) < 5 * sd, f"{name}: rate {rate:.4f}, expected {p} +- {5 * sd:.4f}"


# ---------------------------------------------------------------- determinism, shapes, dtypes


def test_same_key_same_output_and_shapes():
    images = np.stack([smooth_image(i, 32, 32) for i in range(4)])
    augment = _jitted_augment(PREP)
    a = augment(jax.random.key(3), images)
    b = augment(jax.random.key(3), images)
    c = augment(jax.random.key(4), images)
    assert a.shape == (4, 48, 48, 3) and a.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a) - np.asarray(c)).mean() > 0.05
    assert np.isfinite(np.asarray(a)).all()


def test_each_example_gets_its_own_key():
    image = smooth_image(0, 32, 32)
    out = np.asarray(_jitted_augment(PREP)(jax.random.key(0), np.stack([image] * 4)))
    for i, j in itertools.combinations(range(4), 2):
        assert np.abs(out[i] - out[j]).mean() > 0.01


def test_standard_output_is_224_and_jits_with_typed_and_raw_keys():
    prep = Preprocessing(resize=256, crop=224, method="bilinear")
    images = np.stack([smooth_image(1, 32, 32), smooth_image(2, 32, 32)])
    fn = jax.jit(functools.partial(A.train_augment, prep=prep))
    out = fn(jax.random.key(0), images)
    assert out.shape == (2, 224, 224, 3) and out.dtype == jnp.float32
    legacy = fn(jax.random.PRNGKey(0), images)
    assert legacy.shape == (2, 224, 224, 3)


def test_augment_fn_takes_one_key_per_example():
    images = np.stack([smooth_image(i, 32, 32) for i in range(3)])
    keys = jax.random.split(jax.random.key(5), 3)
    per_example = jax.jit(A.make_augment_fn(PREP))(keys, images)
    np.testing.assert_array_equal(
        np.asarray(per_example), np.asarray(_jitted_augment(PREP)(jax.random.key(5), images))
    )
    # An example's view depends only on its own key and image, not on its batch-mates.
    alone = jax.jit(A.make_augment_fn(PREP))(keys[1:2], images[1:2])
    np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(per_example[1]), atol=1e-6)


def test_train_augment_is_apply_of_sampled_params():
    images = np.stack([smooth_image(i, 32, 32) for i in range(4)])

    @jax.jit
    def both(key, images):
        params = A.sample_batch_params(key, images)
        applied = jax.vmap(lambda im, p: A.apply_augment_params(im, p, PREP))(images, params)
        return A.train_augment(key, images, PREP), applied

    out, again = both(jax.random.key(11), images)
    np.testing.assert_allclose(np.asarray(out), np.asarray(again), atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(_jitted_augment(PREP)(jax.random.key(11), images)), atol=1e-5
    )


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[b, H, W, 3\]"):
        A.train_augment(jax.random.key(0), np.zeros((2, 8, 8), np.uint8), PREP)


# ---------------------------------------------------------------- sampling distribution


def test_decision_frequencies_match_probabilities():
    p = _params(32, 32)
    assert_rate(p.jitter, A.JITTER_PROB, "jitter")
    assert_rate(p.grayscale, A.GRAYSCALE_PROB, "grayscale")
    assert_rate(p.blur, A.BLUR_PROB, "blur")
    assert_rate(p.flip, A.FLIP_PROB, "flip")
    # independence of two decisions: P(flip and grayscale) = 0.5 * 0.2
    assert_rate(p.flip & p.grayscale, 0.1, "flip&grayscale")


def test_continuous_parameters_are_uniform_on_their_ranges():
    p = _params(32, 32)
    for name, lo, hi in [
        ("brightness", 0.6, 1.4),
        ("contrast", 0.6, 1.4),
        ("saturation", 0.6, 1.4),
        ("hue", -0.1, 0.1),
        ("sigma", 0.1, 2.0),
    ]:
        x = getattr(p, name)
        assert x.min() >= lo and x.max() <= hi, name
        u = (x - lo) / (hi - lo)  # should be U[0, 1]: mean 1/2, variance 1/12
        assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / u.size), name
        assert abs(u.var() - 1 / 12) < 0.005, name
        assert u.min() < 0.001 and u.max() > 0.999, name


def test_jitter_order_is_a_uniform_permutation():
    order = _params(32, 32).order
    assert (np.sort(order, axis=1) == np.arange(4)).all()
    counts = {}
    for row in map(tuple, order):
        counts[row] = counts.get(row, 0) + 1
    assert len(counts) == 24
    expected = order.shape[0] / 24
    sd = math.sqrt(expected * (1 - 1 / 24))
    assert all(abs(c - expected) < 5 * sd for c in counts.values())


def _torch_crops(height: int, width: int, n: int) -> np.ndarray:
    torch.manual_seed(0)
    dummy = torch.zeros(1, height, width)
    crops = [T.RandomResizedCrop.get_params(dummy, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(n)]
    return np.asarray(crops)


@pytest.mark.parametrize("height,width", [(32, 32), (24, 64), (60, 45)])
def test_crop_sampler_matches_torchvision_distribution(height, width):
    n = 4000
    mine = _params(height, width, n, seed=5)
    ours = np.stack([mine.top, mine.left, mine.height, mine.width], axis=1)
    ref = _torch_crops(height, width, n)
    for arr in (ours, ref):
        assert (arr[:, 0] >= 0).all() and (arr[:, 0] + arr[:, 2] <= height).all()
        assert (arr[:, 1] >= 0).all() and (arr[:, 1] + arr[:, 3] <= width).all()

    def stats(arr):
        area = arr[:, 2] * arr[:, 3] / (height * width)
        log_ratio = np.log(arr[:, 3] / arr[:, 2])
        full = (arr[:, 2] == _central(height, width)[0]) & (arr[:, 3] == _central(height, width)[1])
        centered = full & (arr[:, 0] == (height - arr[:, 2]) // 2)
        return area, log_ratio, centered

    a_ours, r_ours, c_ours = stats(ours)
    a_ref, r_ref, c_ref = stats(ref)
    for x, y, name in [(a_ours, a_ref, "area"), (r_ours, r_ref, "log ratio")]:
        se = math.sqrt(x.var() / n + y.var() / n) + 1e-9
        assert abs(x.mean() - y.mean()) < 5 * se, name
    # fallback (central crop) rate: ours records it, torchvision's is inferred
    p = max(c_ref.mean(), 1 / n)
    assert abs(c_ours.mean() - c_ref.mean()) < 5 * math.sqrt(2 * p * (1 - p) / n) + 2 / n
    assert c_ours[mine.fallback].all()  # a recorded fallback is the central crop


def _central(height, width):
    return A.central_crop_size(height, width)


def test_fallback_is_the_clamped_central_crop():
    # 20x200: no attempt can fit (h would need area/ratio <= 400), so every crop falls back.
    p = _params(20, 200, 64)
    assert p.fallback.all()
    h, w = 20, int(round(20 * 4 / 3))
    assert (p.height == h).all() and (p.width == w).all()
    assert (p.top == 0).all() and (p.left == (200 - w) // 2).all()


# ---------------------------------------------------------------- crops on a coordinate image


def _coordinate_image(height, width):
    y, x = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.stack([4 * y, 2 * x, np.zeros_like(x)], axis=-1).astype(np.uint8)


def test_crops_respect_scale_and_ratio_on_a_coordinate_image():
    height, width, size = 60, 90, 96  # every crop is upsampled: plain linear interpolation
    prep = Preprocessing(size, None, "bilinear", mean=(0, 0, 0), std=(1, 1, 1))
    image = _coordinate_image(height, width)
    n = 200
    params = A.sample_batch_params(jax.random.key(7), jnp.zeros((n, height, width, 3), jnp.uint8))
    off = jnp.zeros(n, bool)
    params = params._replace(jitter=off, grayscale=off, blur=off)
    out = jax.jit(jax.vmap(lambda p: A.apply_augment_params(image, p, prep)))(params)
    out = np.asarray(out) * 255.0
    params = jax.tree_util.tree_map(np.asarray, params)
    o = np.arange(2, size - 2) + 0.5  # interior output pixels: no border clamping
    for i in range(n):
        rows = out[i, 2 : size - 2, size // 2, 0] / 4.0  # source row coordinate
        cols = out[i, size // 2, 2 : size - 2, 1] / 2.0  # source column coordinate
        slope_y, icpt_y = np.polyfit(o, rows, 1)
        slope_x, icpt_x = np.polyfit(o, cols, 1)
        h, w = slope_y * size, abs(slope_x) * size
        top = icpt_y + 0.5
        left = (icpt_x + 0.5) if slope_x > 0 else (icpt_x + slope_x * size + 0.5)
        assert (slope_x < 0) == bool(params.flip[i])
        np.testing.assert_allclose(
            [h, w, top, left],
            [params.height[i], params.width[i], params.top[i], params.left[i]],
            atol=0.02,
        )
        # torchvision's guarantees, allowing for rounding h and w to integers
        area = h * w / (height * width)
        assert area <= 1.0 + 1e-6
        assert h * w >= 0.2 * height * width - 0.5 * (h + w) - 0.25 or params.fallback[i]
        assert 0.75 * (h - 0.5) - 0.5 <= w <= 4 / 3 * (h + 0.5) + 0.5
        assert top >= -0.02 and left >= -0.02
        assert top + h <= height + 0.02 and left + w <= width + 0.02


# ---------------------------------------------------------------- each operation vs oracles


@pytest.mark.parametrize(
    "height,width,box,flip",
    [
        (32, 32, (3, 5, 20, 17), False),
        (32, 32, (0, 0, 32, 32), True),
        (120, 90, (10, 7, 100, 70), False),  # downscaling: antialiased filter
        (45, 70, (4, 9, 33, 41), True),
    ],
)
def test_resized_crop_matches_torchvision_pil(height, width, box, flip):
    image = smooth_image(height + width, height, width)
    size = 48
    top, left, h, w = box
    mine = np.asarray(A.resized_crop(jnp.asarray(image), top, left, h, w, size, flip))
    mine = np.transpose(mine, (1, 2, 0))
    ref = TF.resized_crop(Image.fromarray(image), top, left, h, w, [size, size])
    if flip:
        ref = TF.hflip(ref)
    diff = np.abs(mine - np.asarray(ref, np.float32))
    # Pillow rounds to uint8 after each of its two passes: at most one grey level apart.
    assert diff.max() <= 1.0 + 1e-3, diff.max()
    assert diff.mean() < 0.4


def _torch_op(name, t, value):
    return {
        A.BRIGHTNESS_OP: TF.adjust_brightness,
        A.CONTRAST_OP: TF.adjust_contrast,
        A.SATURATION_OP: TF.adjust_saturation,
        A.HUE_OP: TF.adjust_hue,
    }[name](t, value)


def test_single_colour_ops_match_torchvision():
    x = smooth_image(9, 24, 20).transpose(2, 0, 1).astype(np.float32) / 255.0
    t = torch.from_numpy(x)
    for factor in (0.6, 0.93, 1.4):
        np.testing.assert_allclose(
            A.adjust_brightness(x, factor), TF.adjust_brightness(t, factor), atol=1e-6
        )
        np.testing.assert_allclose(
            A.adjust_contrast(x, factor), TF.adjust_contrast(t, factor), atol=1e-5
        )
        np.testing.assert_allclose(
            A.adjust_saturation(x, factor), TF.adjust_saturation(t, factor), atol=1e-5
        )
    for delta in (-0.1, -0.03, 0.07, 0.1):
        np.testing.assert_allclose(A.adjust_hue(x, delta), TF.adjust_hue(t, delta), atol=1e-4)
    np.testing.assert_allclose(
        np.broadcast_to(A.rgb_to_gray(x), x.shape),
        TF.rgb_to_grayscale(t, num_output_channels=3),
        atol=1e-6,
    )


def test_color_jitter_applies_each_op_once_in_the_given_order():
    x = smooth_image(10, 16, 16).transpose(2, 0, 1).astype(np.float32) / 255.0
    factors = {A.BRIGHTNESS_OP: 1.35, A.CONTRAST_OP: 0.65, A.SATURATION_OP: 1.3, A.HUE_OP: 0.09}
    jitter = jax.jit(A.color_jitter)
    outputs = []
    for order in itertools.permutations(range(4)):
        t = torch.from_numpy(x)
        for op in order:
            t = _torch_op(op, t, factors[op])
        mine = jitter(x, *(factors[k] for k in range(4)), jnp.asarray(order))
        np.testing.assert_allclose(np.asarray(mine), t.numpy(), atol=2e-4, err_msg=str(order))
        outputs.append(np.asarray(mine))
    # the order matters for these factors (so the test above could fail)
    assert max(np.abs(a - outputs[0]).max() for a in outputs) > 0.02


@pytest.mark.parametrize("sigma", [0.1, 0.7, 2.0])
def test_gaussian_blur_matches_scipy_with_replicated_edges(sigma):
    x = smooth_image(12, 30, 26).transpose(2, 0, 1).astype(np.float32) / 255.0
    mine = np.asarray(A.gaussian_blur(jnp.asarray(x), sigma))
    radius = A.BLUR_KERNEL_SIZE // 2
    ref = np.stack(
        [
            ndimage.gaussian_filter(
                c.astype(np.float64), sigma, mode="nearest", truncate=radius / sigma
            )
            for c in x
        ]
    )
    np.testing.assert_allclose(mine, ref, atol=2e-6)
    if sigma == 2.0:
        assert np.abs(mine - x).mean() > 0.02  # it does blur


def _torch_reference(image, p, prep):
    """torchvision composition of the MoCo-v2 pipeline with the decisions ``p`` imposed."""
    pil = TF.resized_crop(
        Image.fromarray(image),
        int(p.top),
        int(p.left),
        int(p.height),
        int(p.width),
        [prep.size, prep.size],
    )
    t = TF.to_tensor(pil)
    if p.jitter:
        values = {0: p.brightness, 1: p.contrast, 2: p.saturation, 3: p.hue}
        for op in p.order:
            t = _torch_op(int(op), t, float(values[int(op)]))
    if p.grayscale:
        t = TF.rgb_to_grayscale(t, num_output_channels=3)
    if p.blur:
        s = float(p.sigma)
        radius = A.BLUR_KERNEL_SIZE // 2
        t = torch.from_numpy(
            np.stack(
                [
                    ndimage.gaussian_filter(c, s, mode="nearest", truncate=radius / s)
                    for c in t.numpy().astype(np.float64)
                ]
            ).astype(np.float32)
        )
    if p.flip:
        t = TF.hflip(t)
    t = TF.normalize(t, prep.mean, prep.std)
    return t.permute(1, 2, 0).numpy()


def test_full_pipeline_matches_torchvision_given_the_same_decisions():
    image = smooth_image(21, 40, 36)
    n = 24
    params = A.sample_batch_params(jax.random.key(2), jnp.zeros((n, 40, 36, 3), jnp.uint8))
    # make sure every operation is exercised both ways in these draws
    flags = jnp.asarray(list(itertools.product([False, True], repeat=4)) * 2)[:n]
    params = params._replace(
        jitter=flags[:, 0], grayscale=flags[:, 1], blur=flags[:, 2], flip=flags[:, 3]
    )
    out = jax.jit(jax.vmap(lambda p: A.apply_augment_params(image, p, PREP)))(params)
    out = np.asarray(out)
    params = jax.tree_util.tree_map(np.asarray, params)
    for i in range(n):
        p = jax.tree_util.tree_map(lambda a, i=i: a[i], params)
        ref = _torch_reference(image, p, PREP)
        diff = np.abs(out[i] - ref) * min(PREP.std)  # back to [0, 1] units
        # Pillow's uint8 rounding of the resize (<= 1/255), carried through the colour ops.
        assert diff.max() < 4.0 / 255, (i, diff.max() * 255)
        assert diff.mean() < 0.6 / 255, (i, diff.mean() * 255)


def test_end_to_end_grayscale_frequency_is_visible_in_outputs():
    # A colourful image stays colourful under jitter (saturation >= 0.6), so equal channels in
    # the output mean the grayscale op ran; its frequency must be 0.2.
    images = np.stack([smooth_image(i, 32, 32) for i in range(4)])
    augment = _jitted_augment(PREP)
    mean, std = np.asarray(PREP.mean), np.asarray(PREP.std)
    gray = []
    for k in range(150):
        out = np.asarray(augment(jax.random.key(1000 + k), images)) * std + mean
        gray.extend(np.abs(out - out[..., :1]).max(axis=(1, 2, 3)) < 1e-5)
    assert_rate(np.asarray(gray), A.GRAYSCALE_PROB, "grayscale (end to end)")
