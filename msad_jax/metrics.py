"""Detection metrics on raw anomaly scores (label 1 = anomaly), in NumPy.

Scores are used exactly as given (never normalised or clipped, SPEC section 7); a higher score
means "more anomalous", and the detector flags ``score >= threshold``. Tied scores are handled as
scikit-learn does: all examples sharing a score enter the ROC / precision-recall curves together,
at one threshold, so ties count half in the ROC-AUC (trapezoid) and AP uses the step interpolation
of ``sklearn.metrics.average_precision_score``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def _validate(labels: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Returns labels as bool and scores as float64 1-D arrays, or raises a clear error."""
    labels_arr = np.asarray(labels)
    scores_arr = np.asarray(scores)
    if labels_arr.ndim != 1 or scores_arr.ndim != 1:
        raise ValueError(
            f"labels and scores must be 1-D, got shapes {labels_arr.shape} and {scores_arr.shape}"
        )
    if labels_arr.shape != scores_arr.shape:
        raise ValueError(
            f"labels and scores differ in length: {labels_arr.shape[0]} vs {scores_arr.shape[0]}"
        )
    if labels_arr.dtype != bool:
        if not np.issubdtype(labels_arr.dtype, np.number):
            raise ValueError(f"labels must be 0/1 or bool, got dtype {labels_arr.dtype}")
        if not np.all((labels_arr == 0) | (labels_arr == 1)):
            bad = np.unique(labels_arr[(labels_arr != 0) & (labels_arr != 1)])[:5]
            raise ValueError(f"labels must be 0 (normal) or 1 (anomaly), found {bad.tolist()}")
        labels_arr = labels_arr == 1
    if not np.issubdtype(scores_arr.dtype, np.number) or np.iscomplexobj(scores_arr):
        raise ValueError(f"scores must be real numbers, got dtype {scores_arr.dtype}")
    scores_arr = scores_arr.astype(np.float64)
    if not np.all(np.isfinite(scores_arr)):
        n_bad = int(np.count_nonzero(~np.isfinite(scores_arr)))
        raise ValueError(f"scores contain {n_bad} NaN/inf values; fix the scorer before evaluating")
    n_pos = int(np.count_nonzero(labels_arr))
    if n_pos == 0 or n_pos == labels_arr.shape[0]:
        which = "anomalies (1)" if n_pos == 0 else "normals (0)"
        raise ValueError(
            f"labels contain a single class (no {which}); the metric needs normals and anomalies"
        )
    return labels_arr, scores_arr


def _binary_counts(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, ...]:
    """Cumulative false/true positive counts at every distinct score, from the highest down.

    Returns:
      ``(fps, tps, thresholds)``: at ``thresholds[i]`` (descending), flagging ``score >=
      thresholds[i]`` gives ``fps[i]`` false and ``tps[i]`` true positives.
    """
    order = np.argsort(scores, kind="stable")[::-1]
    sorted_scores = scores[order]
    sorted_labels = labels[order]
    # Last index of every run of equal scores: ties are added to the curve together.
    last_of_run = np.flatnonzero(np.diff(sorted_scores)) if sorted_scores.size > 1 else []
    ends = np.r_[last_of_run, sorted_scores.size - 1].astype(np.int64)
    tps = np.cumsum(sorted_labels, dtype=np.int64)[ends]
    fps = (ends + 1) - tps
    return fps, tps, sorted_scores[ends]


def roc_curve(
    labels: npt.ArrayLike, scores: npt.ArrayLike, *, drop_intermediate: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve, matching ``sklearn.metrics.roc_curve``.

    Args:
      labels: ``[N]`` 0/1 or bool, 1 = anomaly.
      scores: ``[N]`` raw scores, higher = more anomalous.
      drop_intermediate: drop points that lie on a straight segment between their neighbours
        (as scikit-learn does by default); they do not change the area.

    Returns:
      ``(fpr, tpr, thresholds)``; the first point is ``(0, 0)`` at threshold ``+inf``.

    Raises:
      ValueError: for single-class labels, NaN/inf scores or mismatched shapes.
    """
    fps, tps, thresholds = _binary_counts(*_validate(labels, scores))
    if drop_intermediate and fps.size > 2:
        keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    fps = np.r_[0, fps]
    tps = np.r_[0, tps]
    thresholds = np.r_[np.inf, thresholds]
    return fps / fps[-1], tps / tps[-1], thresholds


def roc_auc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Area under the ROC curve (trapezoid rule; a tie between a normal and an anomaly counts 1/2).

    Args:
      labels: ``[N]`` 0/1 or bool, 1 = anomaly.
      scores: ``[N]`` raw scores, higher = more anomalous.

    Returns:
      ROC-AUC in ``[0, 1]``.

    Raises:
      ValueError: for single-class labels, NaN/inf scores or mismatched shapes.
    """
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2)


def average_precision(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Average precision, ``sum_n (R_n - R_{n-1}) P_n`` over distinct thresholds (scikit-learn's).

    Args:
      labels: ``[N]`` 0/1 or bool, 1 = anomaly (the positive class).
      scores: ``[N]`` raw scores, higher = more anomalous.

    Returns:
      AP in ``[0, 1]``.

    Raises:
      ValueError: for single-class labels, NaN/inf scores or mismatched shapes.
    """
    fps, tps, _ = _binary_counts(*_validate(labels, scores))
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def fpr_at_tpr(labels: npt.ArrayLike, scores: npt.ArrayLike, tpr: float = 0.95) -> float:
    """False-positive rate at the first threshold whose true-positive rate reaches ``tpr``.

    The threshold is lowered one distinct score at a time (no interpolation); the answer is the
    FPR of the highest threshold with ``TPR >= tpr``, which is also the lowest FPR among all
    thresholds reaching that TPR.

    Args:
      labels: ``[N]`` 0/1 or bool, 1 = anomaly.
      scores: ``[N]`` raw scores, higher = more anomalous.
      tpr: target true-positive rate in ``(0, 1]``.

    Returns:
      FPR in ``[0, 1]``.

    Raises:
      ValueError: for a ``tpr`` outside ``(0, 1]``, single-class labels, NaN/inf scores or
        mismatched shapes.
    """
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    fps, tps, _ = _binary_counts(*_validate(labels, scores))
    # Compare counts, not rates, so that e.g. 19/20 >= 0.95 is not lost to rounding.
    needed = tpr * tps[-1]
    reached = tps >= needed - 1e-9 * tps[-1]
    first = int(np.argmax(reached))
    return float(fps[first] / fps[-1])
