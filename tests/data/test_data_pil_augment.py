"""Host MoCo-v2 augmentation with Pillow: bit-exact vs torchvision, same distribution, batching.

Oracles: torchvision's functional ops on PIL images (bit for bit, given the same decisions), its
random transforms' own sampling (``RandomResizedCrop.get_params``, ``ColorJitter.get_params``,
``RandomGrayscale``, ``RandomHorizontalFlip``, the MoCo-v2 ``Compose``) and ``ToTensor`` +
``Normalize``. Tiny images keep it fast.
"""

import itertools
import math
import random

import jax
import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from scipy import stats

from msad_jax.data import augment as A
from msad_jax.data import pil_augment as P
from msad_jax.data.pipeline import train_batches
from msad_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

SIZE = 16
PREP = Preprocessing(resize=SIZE, crop=None, method="bilinear")


def smooth_image(seed: int, height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height // 4 + 2, width // 4 + 2, 3), dtype=np.uint8)
    up = np.asarray(Image.fromarray(base).resize((width, height), Image.BICUBIC), np.int16)
    return np.clip(up + rng.integers(-25, 26, up.shape), 0, 255).astype(np.uint8)


def torchvision_view(image: Image.Image, p: P.PilAugmentParams, size: int) -> Image.Image:
    """The MoCo-v2 chain with torchvision's functional ops and given decisions."""
    x = TF.resized_crop(image, p.top, p.left, p.height, p.width, [size, size])
    if p.jitter:
        ops = {
            0: lambda im: TF.adjust_brightness(im, p.brightness),
            1: lambda im: TF.adjust_contrast(im, p.contrast),
            2: lambda im: TF.adjust_saturation(im, p.saturation),
            3: lambda im: TF.adjust_hue(im, p.hue),
        }
        for op in p.order:
            x = ops[op](x)
    if p.grayscale:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if p.blur:
        x = x.filter(ImageFilter.GaussianBlur(radius=p.sigma))  # MoCo v2's blur
    if p.flip:
        x = TF.hflip(x)
    return x


# ------------------------------------------------------------ bit-exact given the same decisions


def test_each_view_equals_torchvisions_ops_bit_for_bit():
    rng = np.random.default_rng(0)
    seen = set()
    for i in range(120):
        image = smooth_image(i, 20 + i % 7, 24 - i % 5)
        params = P.sample_params(rng, image.shape[0], image.shape[1])
        seen.update(k for k in ("jitter", "grayscale", "blur", "flip") if getattr(params, k))
        ours = np.asarray(P.apply_params(Image.fromarray(image), params, SIZE))
        theirs = np.asarray(torchvision_view(Image.fromarray(image), params, SIZE))
        assert ours.shape == (SIZE, SIZE, 3) and ours.dtype == np.uint8
        np.testing.assert_array_equal(ours, theirs, err_msg=str(params))
    assert seen == {"jitter", "grayscale", "blur", "flip"}


@pytest.mark.parametrize("hue", [-0.1, -0.037, 0.0, 0.05, 0.1])
def test_hue_shift_equals_torchvision(hue):
    image = Image.fromarray(smooth_image(3, 12, 12))
    np.testing.assert_array_equal(
        np.asarray(P.adjust_hue(image, hue)), np.asarray(TF.adjust_hue(image, hue))
    )


def test_device_normalisation_equals_to_tensor_and_normalize():
    views = np.stack([smooth_image(i, SIZE, SIZE) for i in range(3)])
    batch = {"view1": views, "view2": views[::-1], "mask": np.ones(3, bool)}
    out = jax.jit(lambda b: P.normalize_views(b, PREP))(batch)
    oracle = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    for key, images in (("view1", views), ("view2", views[::-1])):
        want = np.stack([oracle(Image.fromarray(v)).permute(1, 2, 0).numpy() for v in images])
        np.testing.assert_allclose(np.asarray(out[key]), want, rtol=0, atol=1e-6)


# ------------------------------------------------------------------- same distribution


def _torch_crops(height, width, n):
    torch.manual_seed(0)
    probe = torch.zeros(3, height, width)
    crop = T.RandomResizedCrop(SIZE, scale=A.CROP_SCALE, ratio=A.CROP_RATIO)
    return np.array([crop.get_params(probe, crop.scale, crop.ratio) for _ in range(n)])


def _our_crops(height, width, n):
    rng = np.random.default_rng(1)
    return np.array([P.sample_crop(rng, height, width) for _ in range(n)])


@pytest.mark.parametrize("shape", [(32, 32), (12, 40)])
def test_crop_boxes_follow_torchvisions_sampler(shape):
    n = 4000
    ours, theirs = _our_crops(*shape, n), _torch_crops(*shape, n)  # rows (top, left, h, w)
    area = lambda c: c[:, 2] * c[:, 3] / (shape[0] * shape[1])  # noqa: E731
    ratio = lambda c: np.log(c[:, 3] / c[:, 2])  # noqa: E731
    for name, f in (("area", area), ("log ratio", ratio)):
        assert stats.ks_2samp(f(ours), f(theirs)).pvalue > 1e-3, name
    for column, name in enumerate(("top", "left", "height", "width")):
        assert stats.ks_2samp(ours[:, column], theirs[:, column]).pvalue > 1e-3, name
    assert (ours[:, 2] <= shape[0]).all() and (ours[:, 3] <= shape[1]).all()
    assert (ours[:, :2] >= 0).all() and (ours[:, 0] + ours[:, 2] <= shape[0]).all()


def test_fallback_is_torchvisions_central_crop():
    class Never:  # draws that never fit: area fraction 1, ratio at the top of the range
        def uniform(self, lo, hi):
            return hi

    top, left, h, w = P.sample_crop(Never(), 10, 40)  # wide image: clamped to ratio 4/3
    assert (top, left, h, w) == (0, (40 - 13) // 2, 10, 13)
    assert (h, w) == A.central_crop_size(10, 40)


def test_jitter_factors_order_and_sigma_match_torchvision():
    n = 6000
    rng = np.random.default_rng(2)
    ours = [P.sample_params(rng, 16, 16) for _ in range(n)]
    torch.manual_seed(2)
    jitter = T.ColorJitter(0.4, 0.4, 0.4, 0.1)
    theirs = [
        jitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
        for _ in range(n)
    ]
    for k, name in enumerate(("brightness", "contrast", "saturation", "hue"), start=1):
        a = np.array([getattr(p, name) for p in ours])
        b = np.array([t[k] for t in theirs])
        lo, hi = (-0.1, 0.1) if name == "hue" else (0.6, 1.4)
        assert lo <= a.min() and a.max() <= hi and a.min() < lo + 0.01 and a.max() > hi - 0.01
        assert stats.ks_2samp(a, b).pvalue > 1e-3, name
    # the 24 orders are equally likely, as torch.randperm(4)
    perms = list(itertools.permutations(range(4)))
    counts_ours = np.array([sum(p.order == q for p in ours) for q in perms])
    counts_theirs = np.array([sum(tuple(t[0].tolist()) == q for t in theirs) for q in perms])
    assert stats.chisquare(counts_ours).pvalue > 1e-3
    assert stats.chisquare(counts_theirs).pvalue > 1e-3  # the oracle itself is uniform
    # blur radius ~ U[0.1, 2.0] as MoCo v2's random.uniform(0.1, 2.0)
    random.seed(2)
    sigma = np.array([p.sigma for p in ours])
    assert stats.ks_2samp(sigma, [random.uniform(0.1, 2.0) for _ in range(n)]).pvalue > 1e-3


def _binomial_close(a: float, b: float, n: int) -> bool:
    p = (a + b) / 2
    return abs(a - b) < 5 * math.sqrt(2 * p * (1 - p) / n)


def test_flag_frequencies_match_torchvisions_random_transforms():
    n = 4000
    rng = np.random.default_rng(3)
    ours = [P.sample_params(rng, 16, 16) for _ in range(n)]
    torch.manual_seed(3)
    colour = Image.fromarray(smooth_image(0, 6, 6))
    gray = T.RandomGrayscale(p=A.GRAYSCALE_PROB)
    flip = T.RandomHorizontalFlip(p=A.FLIP_PROB)
    applied = T.RandomApply([T.Grayscale(3)], p=A.JITTER_PROB)  # a visible stand-in op
    rates = {
        "grayscale": np.mean(
            [np.ptp(np.asarray(gray(colour)), axis=2).max() == 0 for _ in range(n)]
        ),
        "flip": np.mean([flip(colour).tobytes() != colour.tobytes() for _ in range(n)]),
        "jitter": np.mean([applied(colour).tobytes() != colour.tobytes() for _ in range(n)]),
    }
    for name, theirs in rates.items():
        mine = np.mean([getattr(p, name) for p in ours])
        assert _binomial_close(mine, theirs, n), (name, mine, theirs)
    assert _binomial_close(np.mean([p.blur for p in ours]), A.BLUR_PROB, 2 * n)


def test_views_have_the_pixel_statistics_of_torchvisions_pipeline():
    """Whole chain vs torchvision's Compose (MoCo v2) on the same images: per-view statistics."""
    n_images, repeats = 25, 40
    ramp = np.linspace(0, 120, 12)[None, :, None]  # brighter on the right: flips show
    images = [
        np.clip(smooth_image(100 + i, 12, 12) * 0.5 + ramp, 0, 255).astype(np.uint8)
        for i in range(n_images)
    ]
    rng = np.random.default_rng(4)
    ours = np.stack(
        [P.augment_image(im, rng, SIZE).astype(np.float32) for _ in range(repeats) for im in images]
    )
    torch.manual_seed(4)
    random.seed(4)
    moco = T.Compose(
        [
            T.RandomResizedCrop(SIZE, scale=A.CROP_SCALE, ratio=A.CROP_RATIO),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=A.JITTER_PROB),
            T.RandomGrayscale(p=A.GRAYSCALE_PROB),
            T.RandomApply(
                [lambda im: im.filter(ImageFilter.GaussianBlur(random.uniform(0.1, 2.0)))],
                p=A.BLUR_PROB,
            ),
            T.RandomHorizontalFlip(),
        ]
    )
    pils = [Image.fromarray(im) for im in images]
    theirs = np.stack([np.asarray(moco(pil), np.float32) for _ in range(repeats) for pil in pils])
    features = {
        "mean": lambda v: v.mean(axis=(1, 2, 3)),
        "std": lambda v: v.std(axis=(1, 2, 3)),
        "saturation": lambda v: (v.max(axis=3) - v.min(axis=3)).mean(axis=(1, 2)),
        "left-right": lambda v: (v[:, :, : SIZE // 2] - v[:, :, SIZE // 2 :]).mean(axis=(1, 2, 3)),
        "sharpness": lambda v: np.abs(np.diff(v, axis=2)).mean(axis=(1, 2, 3)),
    }
    for name, f in features.items():
        assert stats.ks_2samp(f(ours), f(theirs)).pvalue > 1e-3, name
    gray = lambda v: (v.max(axis=3) == v.min(axis=3)).all(axis=(1, 2))  # noqa: E731
    assert _binomial_close(gray(ours).mean(), gray(theirs).mean(), len(ours))


# ---------------------------------------------------------------------------- batching


def _views(num_devices, *, start_step=0, seed=7, workers=2):
    images = np.stack([smooth_image(i, 10, 10) for i in range(10)])
    batches = train_batches(
        images, global_batch_size=4, num_devices=num_devices, seed=0, epoch=1,
        start_step=start_step,
    )  # fmt: skip
    out = P.host_view_batches(
        batches, size=SIZE, seed=seed, first_step=3 + start_step, workers=workers, ahead=1
    )
    return [{k: v.reshape(-1, *v.shape[2:]) for k, v in b.items()} for b in out], images


def test_views_do_not_depend_on_devices_threads_or_resuming():
    one, images = _views(1, workers=1)
    assert len(one) == 3  # 10 images, batch 4: the last batch is padded
    assert one[0]["view1"].shape == (4, SIZE, SIZE, 3) and one[0]["view1"].dtype == np.uint8
    assert one[-1]["mask"].tolist() == [True, True, False, False]
    two, _ = _views(2, workers=3)
    resumed, _ = _views(1, start_step=1)
    for a, b in zip(one, two, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    for a, b in zip(one[1:], resumed, strict=True):
        np.testing.assert_array_equal(a["view2"], b["view2"])
    # the views are the documented function of (seed, step, view, row)
    order = np.random.default_rng([0, 1]).permutation(10)
    want = P.augment_image(images[order[5]], P.example_rng(7, 4, 1, 1), SIZE)
    np.testing.assert_array_equal(one[1]["view2"][1], want)
    # two views of an image differ, and so do the seeds of different runs
    assert not np.array_equal(one[0]["view1"], one[0]["view2"])
    other, _ = _views(1, seed=8)
    assert not np.array_equal(one[0]["view1"], other[0]["view1"])


def test_process_slices_use_their_global_rows():
    images = np.stack([smooth_image(i, 10, 10) for i in range(8)])
    kwargs = dict(global_batch_size=8, num_devices=1, seed=0, epoch=0)
    whole = next(P.host_view_batches(train_batches(images, **kwargs), size=SIZE, seed=1,
                                     first_step=0, workers=1))  # fmt: skip
    second = next(
        P.host_view_batches(
            train_batches(images, process_index=1, process_count=2, **kwargs),
            size=SIZE,
            seed=1,
            first_step=0,
            process_index=1,
            workers=1,
        )  # fmt: skip
    )
    np.testing.assert_array_equal(second["view1"][0], whole["view1"][0, 4:])
