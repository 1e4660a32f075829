import numpy as np
import pytest

from msad_jax import metrics


def _tied_data(seed: int, n: int = 300, levels: int = 12):
    """Random labels and scores with many ties (scores take only `levels` values)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    scores = np.round(rng.normal(size=n) + 0.8 * labels, 0) * 0.5 + rng.integers(0, 2, size=n)
    scores = np.floor(scores * levels / 4) / levels  # coarse grid -> many ties
    return labels, scores.astype(np.float32)


def _pairwise_auroc(labels, scores) -> float:
    """Independent oracle: the share of (anomaly, normal) pairs ranked right, ties counting 1/2."""
    labels = np.asarray(labels, bool)
    diff = np.asarray(scores, np.float64)[labels][:, None] - np.asarray(scores)[~labels][None, :]
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def _counts(labels, scores):
    """Independent oracle: (fp, tp) when flagging score >= t, for every distinct t descending."""
    labels = np.asarray(labels, bool)
    thresholds = np.unique(scores)[::-1]
    flagged = np.asarray(scores)[None, :] >= thresholds[:, None]
    return (flagged & ~labels).sum(1), (flagged & labels).sum(1), thresholds


def _step_ap(labels, scores) -> float:
    """Independent oracle: sum over distinct thresholds of (recall gain) x precision."""
    fp, tp, _ = _counts(labels, scores)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * tp / (tp + fp)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_and_ap_with_ties(seed):
    labels, scores = _tied_data(seed)
    assert len(np.unique(scores)) < len(scores) // 4  # the data really has ties
    assert metrics.roc_auc(labels, scores) == pytest.approx(
        _pairwise_auroc(labels, scores), abs=1e-12
    )
    assert metrics.average_precision(labels, scores) == pytest.approx(
        _step_ap(labels, scores), abs=1e-12
    )


def test_metrics_on_continuous_scores_and_bool_labels():
    rng = np.random.default_rng(3)
    labels = rng.random(1000) < 0.9  # imbalanced like the one-class protocol (9000 vs 1000)
    scores = rng.normal(size=1000) + labels
    assert metrics.roc_auc(labels, scores) == pytest.approx(_pairwise_auroc(labels, scores))
    assert metrics.average_precision(labels, scores) == pytest.approx(_step_ap(labels, scores))


@pytest.mark.parametrize("drop_intermediate", [True, False])
def test_roc_curve(drop_intermediate):
    labels, scores = _tied_data(4)
    fpr, tpr, thresholds = metrics.roc_curve(labels, scores, drop_intermediate=drop_intermediate)
    fp, tp, distinct = _counts(labels, scores)
    assert (fpr[0], tpr[0], thresholds[0]) == (0.0, 0.0, np.inf)
    # Every point is the (fp, tp) of flagging score >= its threshold; all of them without dropping.
    index = np.searchsorted(-distinct, -thresholds[1:])
    np.testing.assert_array_equal(distinct[index], thresholds[1:])
    np.testing.assert_allclose(fpr[1:], fp[index] / fp[-1], rtol=0, atol=1e-12)
    np.testing.assert_allclose(tpr[1:], tp[index] / tp[-1], rtol=0, atol=1e-12)
    assert len(thresholds) - 1 == len(distinct) or drop_intermediate
    area = np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2  # trapezoids
    assert area == pytest.approx(_pairwise_auroc(labels, scores), abs=1e-12)


def test_auroc_tie_counts_half():
    # One normal and one anomaly with the same score: AUROC is exactly 1/2.
    assert metrics.roc_auc([0, 1], [3.0, 3.0]) == 0.5
    # Perfect separation and perfect inversion.
    assert metrics.roc_auc([0, 0, 1], [0.1, 0.2, 0.3]) == 1.0
    assert metrics.roc_auc([0, 0, 1], [0.5, 0.2, 0.1]) == 0.0


def test_scores_are_used_raw():
    # Large scores with tiny gaps must not be squashed (no normalisation or clipping).
    labels = np.array([0, 1, 0, 1])
    scores = np.array([1e6, 1e6 + 1, 1e6 + 2, 1e6 + 3])
    assert metrics.roc_auc(labels, scores) == pytest.approx(_pairwise_auroc(labels, scores))
    assert metrics.roc_auc(labels, -scores) == pytest.approx(1 - metrics.roc_auc(labels, scores))


def _hand_case():
    # 20 anomalies with scores 10, 11, ..., 29 and 10 normals.
    anomalies = np.arange(10.0, 30.0)
    normals = np.array([0, 1, 2, 3, 4, 5, 6, 10.5, 12.5, 30.0])
    labels = np.r_[np.ones(20), np.zeros(10)]
    return labels, np.r_[anomalies, normals]


def test_fpr_at_95_tpr_hand_case():
    labels, scores = _hand_case()
    # TPR >= 0.95 needs 19 of the 20 anomalies flagged. The highest threshold doing so is t = 11
    # (anomalies 11..29 are 19). Normals with score >= 11: 12.5 and 30, so FPR = 2/10 = 0.2.
    # (t = 10.5 also gives 19 TP but adds the normal 10.5: 0.3, which is not the answer.)
    assert metrics.fpr_at_tpr(labels, scores, tpr=0.95) == pytest.approx(0.2)
    # TPR = 1 needs t = 10: normals >= 10 are 10.5, 12.5, 30 -> FPR = 3/10.
    assert metrics.fpr_at_tpr(labels, scores, tpr=1.0) == pytest.approx(0.3)
    # TPR >= 0.5 needs 10 anomalies: t = 20 (20..29); only the normal 30 is >= 20 -> 1/10.
    assert metrics.fpr_at_tpr(labels, scores, tpr=0.5) == pytest.approx(0.1)


def test_fpr_at_95_tpr_hand_case_with_a_tie():
    labels, scores = _hand_case()
    scores[26] = 11.0  # the normal scored 6 now ties with the critical anomaly scored 11
    # 19 TP still need t = 11, and a tied normal is flagged together with the anomaly: normals
    # >= 11 are 11, 12.5 and 30 -> FPR = 3/10. (Breaking the tie in the anomaly's favour would
    # give 2/10.)
    assert metrics.fpr_at_tpr(labels, scores) == pytest.approx(0.3)


def test_fpr_at_tpr_on_tied_data():
    labels, scores = _tied_data(5)
    fp, tp, _ = _counts(labels, scores)
    expected = fp[np.argmax(tp >= 0.95 * tp[-1])] / fp[-1]
    assert metrics.fpr_at_tpr(labels, scores) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("labels", "scores", "match"),
    [
        ([1, 1, 1], [0.1, 0.2, 0.3], "single class"),
        ([0, 0], [0.1, 0.2], "single class"),
        ([0, 1, 1], [0.1, np.nan, 0.3], "NaN"),
        ([0, 1, 1], [0.1, np.inf, 0.3], "NaN"),
        ([0, 1, 2], [0.1, 0.2, 0.3], "0 \\(normal\\) or 1"),
        ([0, 1], [0.1, 0.2, 0.3], "differ in length"),
        ([[0, 1]], [[0.1, 0.2]], "1-D"),
    ],
)
def test_bad_input_raises(labels, scores, match):
    for fn in (metrics.roc_auc, metrics.average_precision, metrics.fpr_at_tpr, metrics.roc_curve):
        with pytest.raises(ValueError, match=match):
            fn(labels, scores)


def test_bad_tpr_raises():
    with pytest.raises(ValueError, match="tpr must be in"):
        metrics.fpr_at_tpr([0, 1], [0.0, 1.0], tpr=0.0)
