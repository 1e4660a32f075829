"""Evaluation of a model on a one-class problem: features, kNN scores and metrics (SPEC §7).

The gallery is phi of all normal training images; a test score is the sum of squared distances to
the ``k`` nearest gallery rows. With several processes every process gets all features and
computes the same scores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from msad_jax import knn, metrics
from msad_jax.data.pipeline import eval_batches
from msad_jax.data.protocols import OneClassData
from msad_jax.features import FeatureFn, extract_features, extract_features_and_center

PyTree = Any


class NonFiniteFeaturesError(ValueError):
    """The model gives NaN or infinite features: its parameters, not the scorer, are at fault."""


def check_finite_features(features: np.ndarray, what: str) -> None:
    """Raises :class:`NonFiniteFeaturesError` if ``features`` hold a NaN or infinity."""
    bad = int(np.sum(~np.isfinite(features).all(axis=-1)))
    if bad:
        raise NonFiniteFeaturesError(
            f"{bad} of {len(features)} {what} have NaN or infinite features"
        )


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Scores and metrics of one evaluation.

    Attributes:
      gallery: phi of the normal training images ``[N, D]``.
      scores: anomaly scores of the test images ``[M]``.
      labels: test labels ``[M]`` (1 = anomaly).
      metrics: ``auroc``, ``average_precision`` and ``fpr_at_95_tpr``.
      center: mean of the gallery (``[D]``; unit-norm when requested), or None.
    """

    gallery: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    metrics: dict[str, float]
    center: np.ndarray | None = None


def score_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """ROC-AUC, average precision and FPR at 95% TPR of raw scores."""
    return {
        "auroc": metrics.roc_auc(labels, scores),
        "average_precision": metrics.average_precision(labels, scores),
        "fpr_at_95_tpr": metrics.fpr_at_tpr(labels, scores, 0.95),
    }


def batch_size_for_devices(batch_size: int, num_devices: int) -> int:
    """Rounds a global evaluation batch up to a multiple of the device count."""
    return -(-batch_size // num_devices) * num_devices


def _process_batches(images: np.ndarray, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """This process's slices of the global evaluation batches of ``images``."""
    devices = jax.local_device_count()
    processes = jax.process_count()
    return eval_batches(
        images,
        global_batch_size=batch_size_for_devices(batch_size, devices * processes),
        num_devices=devices,
        process_index=jax.process_index(),
        process_count=processes,
    )


def features_of(
    extractor: FeatureFn, variables: PyTree, images: np.ndarray, *, batch_size: int
) -> np.ndarray:
    """phi of ``images`` (uint8 ``[N, H, W, 3]``) with replicated ``variables``."""
    return extract_features(extractor, variables, _process_batches(images, batch_size))


def gallery_and_center(
    extractor: FeatureFn,
    variables: PyTree,
    images: np.ndarray,
    *,
    batch_size: int,
    normalize_center: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Gallery features and their center (SPEC §3) in one pass over the training images."""
    return extract_features_and_center(
        extractor, variables, _process_batches(images, batch_size), normalize=normalize_center
    )


def leave_one_out_scores(
    gallery: np.ndarray, k: int, *, memory_budget_bytes: int = knn.DEFAULT_MEMORY_BUDGET_BYTES
) -> np.ndarray:
    """kNN scores of the gallery's own rows, each against the others (for thresholds)."""
    if len(gallery) <= k:
        raise ValueError(f"Need more than k={k} training images for leave-one-out scores.")
    distances = knn.knn_distances(gallery, gallery, k + 1, memory_budget_bytes=memory_budget_bytes)
    distances = np.sort(np.asarray(distances), axis=1)
    return distances[:, 1:].sum(axis=1)


def evaluate(
    extractor: FeatureFn,
    variables: PyTree,
    data: OneClassData,
    *,
    k: int = 2,
    batch_size: int = 256,
    memory_budget_bytes: int = knn.DEFAULT_MEMORY_BUDGET_BYTES,
    center: bool = False,
    normalize_center: bool = False,
) -> Evaluation:
    """Scores the test images of ``data`` against its training images.

    Args:
      extractor: pmapped feature function (:func:`msad_jax.features.make_feature_extractor`).
      variables: replicated model variables.
      data: the one-class problem.
      k: number of neighbours.
      batch_size: global feature-extraction batch.
      memory_budget_bytes: kNN working-memory bound.
      center: also return the gallery's center.
      normalize_center: re-normalise that center (the angular term is on).

    Raises:
      NonFiniteFeaturesError: the model's features are not finite (no scores are computed).
    """
    if center:
        gallery, mean = gallery_and_center(
            extractor,
            variables,
            data.train_images,
            batch_size=batch_size,
            normalize_center=normalize_center,
        )
    else:
        gallery = features_of(extractor, variables, data.train_images, batch_size=batch_size)
        mean = None
    test = features_of(extractor, variables, data.test_images, batch_size=batch_size)
    check_finite_features(gallery, "training images")
    check_finite_features(test, "test images")
    scores = np.asarray(
        knn.knn_scores(gallery, test, k, memory_budget_bytes=memory_budget_bytes), np.float64
    )
    labels = np.asarray(data.test_labels)
    return Evaluation(
        gallery=gallery,
        scores=scores,
        labels=labels,
        metrics=score_metrics(labels, scores),
        center=mean,
    )
