"""Pillow evaluation preprocessing: equals torchvision's pipeline, and so does epoch-0 ROC-AUC.

Oracles: torchvision's ``Resize`` + ``CenterCrop`` + ``ToTensor`` + ``Normalize`` on PIL images,
a torchvision ResNet-18 (same weights, converted) with NumPy kNN and scikit-learn's ROC-AUC.
"""

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image
from sklearn.metrics import roc_auc_score

from msad_jax import evaluation
from msad_jax.data import pil_eval
from msad_jax.data.protocols import OneClassData
from msad_jax.data.synthetic import synthetic_arrays
from msad_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, eval_transform
from msad_jax.features import make_feature_extractor
from msad_jax.models import build_backbone, from_torchvision
from msad_jax.train_step import replicate_state


def torchvision_eval(prep: Preprocessing) -> T.Compose:
    method = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}
    resize = prep.resize if prep.crop is not None else (prep.resize, prep.resize)
    steps = [T.Resize(resize, interpolation=method[prep.method])]
    if prep.crop is not None:
        steps.append(T.CenterCrop(prep.crop))
    return T.Compose([*steps, T.ToTensor(), T.Normalize(prep.mean, prep.std)])


def images(n, height, width, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, height // 3 + 2, width // 3 + 2, 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(b).resize((width, height))) for b in base])


PREPS = [
    Preprocessing(resize=40, crop=None, method="bicubic"),
    Preprocessing(resize=36, crop=28, method="bilinear"),
    Preprocessing(resize=20, crop=16, method="bicubic", mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4)),
]


@pytest.mark.parametrize("prep", PREPS)
@pytest.mark.parametrize("shape", [(12, 12), (11, 17), (30, 22)])
def test_pil_resize_and_normalise_equal_torchvisions_eval_pipeline(prep, shape):
    batch = images(3, *shape)
    resized = pil_eval.PilResizedImages(batch, prep, workers=2)
    assert resized.shape == (3, prep.size, prep.size, 3) and len(resized) == 3
    ours = np.asarray(pil_eval.make_normalize_fn(prep)(resized[np.arange(3)]))
    oracle = torchvision_eval(prep)
    want = np.stack([oracle(Image.fromarray(im)).permute(1, 2, 0).numpy() for im in batch])
    np.testing.assert_allclose(ours, want, rtol=0, atol=1e-6)
    # integer, slice and array indexing agree
    np.testing.assert_array_equal(resized[1], resized[np.array([1])][0])
    np.testing.assert_array_equal(resized[1:3], resized[np.array([1, 2])])


def test_the_float_transform_is_what_differs():
    """The default float resize is not rounded, so its inputs differ from torchvision's."""
    prep = PREPS[0]
    batch = images(4, 32, 32)
    oracle = torchvision_eval(prep)
    want = np.stack([oracle(Image.fromarray(im)).permute(1, 2, 0).numpy() for im in batch])
    float_inputs = np.asarray(eval_transform(batch, prep))
    assert np.abs(float_inputs - want).max() > 1e-3


def test_eval_inputs_choose_the_pipeline():
    arrays = synthetic_arrays(size=12, train_per_class=4, test_per_class=2, seed=0)
    data = OneClassData(
        train_images=arrays.train_images[:4], test_images=arrays.test_images[:6],
        test_labels=np.array([0, 1, 1, 0, 1, 1]), test_classes=np.zeros(6, np.int32),
        class_names=["a"], normal_class=0, name="x",
    )  # fmt: skip
    prep = PREPS[1]
    same, holdout, _ = pil_eval.eval_inputs("float", data, data.train_images[:0], prep)
    assert same is data and holdout.shape[0] == 0
    resized, holdout, _ = pil_eval.eval_inputs("pil", data, data.train_images[:2], prep)
    assert resized.train_images.shape == (4, 28, 28, 3) and holdout.shape == (2, 28, 28, 3)
    np.testing.assert_array_equal(
        resized.test_images[5], pil_eval.pil_eval_resize(data.test_images[5], prep)
    )
    with pytest.raises(ValueError, match="eval_resize='round'"):
        pil_eval.eval_inputs("round", data, holdout, prep)


def _torch_auroc(model, prep, data):
    oracle = torchvision_eval(prep)

    def phi(batch):
        x = torch.stack([oracle(Image.fromarray(im)) for im in batch])
        with torch.no_grad():
            return torch.nn.functional.normalize(model(x), dim=1).numpy().astype(np.float64)

    gallery, test = phi(data.train_images), phi(data.test_images)
    d2 = ((test[:, None, :] - gallery[None, :, :]) ** 2).sum(-1)
    scores = np.sort(d2, axis=1)[:, :2].sum(1)
    return roc_auc_score(data.test_labels, scores)


def test_epoch0_auroc_equals_a_torchvision_pipelines():
    """Acceptance: pretrained-kNN ROC-AUC through both pipelines agrees to 0.01 points."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    model.fc = torch.nn.Identity()
    variables = from_torchvision(state, "resnet18", with_classifier=False)
    flax_model = build_backbone("resnet18")
    arrays = synthetic_arrays(size=24, train_per_class=4, test_per_class=3, seed=3)
    normal = arrays.train_labels == 0
    data = OneClassData(
        train_images=arrays.train_images[normal][:24], test_images=arrays.test_images,
        test_labels=(arrays.test_labels != 0).astype(np.int32),
        test_classes=arrays.test_labels.astype(np.int32), class_names=list(arrays.class_names),
        normal_class=0, name="synthetic",
    )  # fmt: skip
    prep = Preprocessing(resize=40, crop=32, method="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    eval_data, _, preprocess = pil_eval.eval_inputs("pil", data, data.train_images[:0], prep)
    extractor = make_feature_extractor(flax_model, preprocess)
    ours = evaluation.evaluate(extractor, replicate_state(variables), eval_data, k=2)
    theirs = _torch_auroc(model, prep, data)
    assert 0.3 < theirs < 1.0  # the test set is not trivially separable by these features
    assert abs(ours.metrics["auroc"] - theirs) < 1e-4  # 0.01 points
