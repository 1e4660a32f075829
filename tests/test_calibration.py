"""msad_jax.calibration: thresholds at a target false-positive rate from normal scores only."""

import math

import numpy as np
import pytest

from msad_jax import calibration


def test_threshold_is_the_conformal_order_statistic():
    scores = np.random.default_rng(0).permutation(np.arange(1.0, 201.0))  # 1..200, shuffled
    # ceil(201 * 0.95) = 191: the 191st smallest score; 9 of the 200 are above it.
    assert calibration.threshold_at_fpr(scores, 0.05) == 191.0
    assert calibration.threshold_at_fpr(scores, 0.01) == 199.0  # ceil(201 * 0.99) = 199
    assert calibration.threshold_at_fpr(scores, 0.5) == 101.0  # ceil(100.5) = 101


@pytest.mark.parametrize(("n", "fpr"), [(50, 0.05), (19, 0.05), (120, 0.01), (400, 0.05)])
def test_expected_false_positive_rate_is_at_most_the_target(n, fpr):
    # Exchangeable normal scores: draw n calibration scores and one new score from one
    # distribution, many times; the new one exceeds the threshold with probability
    # 1 - r / (n + 1), r = ceil((n + 1)(1 - fpr)), which lies in (fpr - 1 / (n + 1), fpr].
    rng = np.random.default_rng(n)
    trials = 20000
    samples = rng.standard_normal((trials, n + 1))
    flagged = [row[-1] > calibration.threshold_at_fpr(row[:-1], fpr) for row in samples]
    rate = float(np.mean(flagged))
    expected = 1 - math.ceil((n + 1) * (1 - fpr)) / (n + 1)
    assert fpr - 1 / (n + 1) < expected <= fpr + 1e-12
    assert rate == pytest.approx(expected, abs=4 * math.sqrt(expected * (1 - expected) / trials))


def test_too_few_scores_for_a_rate_is_one_clear_error():
    assert calibration.min_calibration_scores(0.01) == 99
    assert calibration.min_calibration_scores(0.05) == 19
    calibration.threshold_at_fpr(np.arange(99.0), 0.01)  # enough: the largest score
    with pytest.raises(calibration.CalibrationError, match="needs at least 99 .* has 98"):
        calibration.threshold_at_fpr(np.arange(98.0), 0.01)
    for bad in (0.0, 1.0, -0.1, 5.0):
        with pytest.raises(calibration.CalibrationError, match=r"must lie in \(0, 1\)"):
            calibration.threshold_at_fpr(np.arange(500.0), bad)


def test_flag_rate_counts_scores_strictly_above():
    assert calibration.flag_rate(np.array([1.0, 2.0, 3.0, 4.0]), 2.0) == 0.5
    assert np.isnan(calibration.flag_rate(np.zeros(0), 1.0))


def test_holdout_split_is_seeded_disjoint_and_ordered():
    kept, held = calibration.holdout_split(100, 0.2, seed=3)
    assert len(held) == 20 and len(kept) == 80
    assert set(kept).isdisjoint(held) and set(kept) | set(held) == set(range(100))
    assert np.all(np.diff(kept) > 0) and np.all(np.diff(held) > 0)
    again = calibration.holdout_split(100, 0.2, seed=3)
    np.testing.assert_array_equal(again[1], held)
    assert not np.array_equal(calibration.holdout_split(100, 0.2, seed=4)[1], held)
    assert len(calibration.holdout_split(10, 0.01, seed=0)[1]) == 1  # at least one
    assert len(calibration.holdout_split(10, 0.0, seed=0)[1]) == 0
    with pytest.raises(calibration.CalibrationError, match="leaves none to train on"):
        calibration.holdout_split(1, 0.5, seed=0)
    with pytest.raises(calibration.CalibrationError, match=r"\[0, 1\)"):
        calibration.holdout_split(10, 1.0, seed=0)
