"""Detection metrics of raw anomaly scores (label 1 = anomaly): scikit-learn's, input-checked."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from sklearn import metrics


def _validate(labels: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Labels as bool and scores as float64, 1-D; a ValueError names the first problem."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    if labels.ndim != 1 or scores.ndim != 1:
        raise ValueError(
            f"labels and scores must be 1-D, got shapes {labels.shape} and {scores.shape}"
        )
    if labels.shape != scores.shape:
        raise ValueError(
            f"labels and scores differ in length: {labels.shape[0]} vs {scores.shape[0]}"
        )
    if labels.dtype != bool:
        if not np.issubdtype(labels.dtype, np.number):
            raise ValueError(f"labels must be 0/1 or bool, got dtype {labels.dtype}")
        bad = np.unique(labels[(labels != 0) & (labels != 1)])[:5]
        if bad.size:
            raise ValueError(f"labels must be 0 (normal) or 1 (anomaly), found {bad.tolist()}")
        labels = labels == 1
    if not np.issubdtype(scores.dtype, np.number) or np.iscomplexobj(scores):
        raise ValueError(f"scores must be real numbers, got dtype {scores.dtype}")
    scores = scores.astype(np.float64)
    if not np.isfinite(scores).all():
        n_bad = int(np.count_nonzero(~np.isfinite(scores)))
        raise ValueError(f"scores contain {n_bad} NaN/inf values; fix the scorer before evaluating")
    if labels.all() or not labels.any():
        which = "anomalies (1)" if not labels.any() else "normals (0)"
        raise ValueError(
            f"labels contain a single class (no {which}); the metric needs normals and anomalies"
        )
    return labels, scores


def roc_curve(
    labels: npt.ArrayLike, scores: npt.ArrayLike, *, drop_intermediate: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` of ``sklearn.metrics.roc_curve``; starts at threshold +inf.

    Raises:
      ValueError: for single-class labels, NaN/inf scores or mismatched shapes.
    """
    labels, scores = _validate(labels, scores)
    return metrics.roc_curve(labels, scores, drop_intermediate=drop_intermediate)


def roc_auc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Area under the ROC curve (a tie between a normal and an anomaly counts 1/2).

    Raises:
      ValueError: for single-class labels, NaN/inf scores or mismatched shapes.
    """
    return float(metrics.roc_auc_score(*_validate(labels, scores)))


def average_precision(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Average precision with the anomalies as the positive class (step interpolation).

    Raises:
      ValueError: for single-class labels, NaN/inf scores or mismatched shapes.
    """
    return float(metrics.average_precision_score(*_validate(labels, scores)))


def fpr_at_tpr(labels: npt.ArrayLike, scores: npt.ArrayLike, tpr: float = 0.95) -> float:
    """False-positive rate at the highest threshold whose true-positive rate reaches ``tpr``.

    Raises:
      ValueError: for a ``tpr`` outside ``(0, 1]``, single-class labels, NaN/inf scores or
        mismatched shapes.
    """
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    fprs, tprs, _ = roc_curve(labels, scores, drop_intermediate=False)
    # A tolerance, so that e.g. 19/20 >= 0.95 is not lost to rounding.
    return float(fprs[np.argmax(tprs >= tpr - 1e-12)])
