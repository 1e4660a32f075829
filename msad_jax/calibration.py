"""Decision thresholds from normal images only, at a target false-positive rate.

From ``n`` calibration scores of normal images scored the way new ones will be, the threshold is
the ``ceil((n + 1)(1 - alpha))``-th smallest: by exchangeability a new normal image exceeds it with
probability in ``(alpha - 1/(n + 1), alpha]``; this needs ``n >= 1/alpha - 1`` (99 for 1%). Only
NumPy: shared by training and inference.
"""

from __future__ import annotations

import math

import numpy as np

from msad_jax.errors import InputError

LEAVE_ONE_OUT = "leave_one_out"
HOLDOUT = "holdout"


class CalibrationError(InputError):
    """A target false-positive rate cannot be met with the calibration scores at hand."""


def check_fpr(fpr: float, what: str = "the target false-positive rate") -> float:
    """``fpr`` as a float if it lies in (0, 1).

    Raises:
      CalibrationError: naming ``what`` otherwise.
    """
    value = float(fpr)
    if not 0.0 < value < 1.0:
        raise CalibrationError(f"{what} must lie in (0, 1) (0.05 = 5%), got {fpr}.")
    return value


def min_calibration_scores(fpr: float) -> int:
    """The fewest calibration scores that can set a threshold at ``fpr``: ``ceil(1/fpr - 1)``."""
    return math.ceil(1.0 / check_fpr(fpr) - 1.0 - 1e-9)


def threshold_at_fpr(calibration_scores: np.ndarray, fpr: float) -> float:
    """The threshold flagging at most ``fpr`` of normal images (see the module docstring).

    Args:
      calibration_scores: ``[n]`` scores of normal images (finite).
      fpr: target false-positive rate in (0, 1).

    Returns:
      The ``ceil((n + 1) * (1 - fpr))``-th smallest calibration score; flag ``score > threshold``.

    Raises:
      CalibrationError: ``fpr`` is outside (0, 1), or ``n`` is too small for it.
    """
    fpr = check_fpr(fpr)
    scores = np.sort(np.asarray(calibration_scores, np.float64).reshape(-1))
    n = len(scores)
    # The rank, robust to (n + 1) * (1 - fpr) landing a rounding error above an integer.
    rank = math.ceil((n + 1) * (1.0 - fpr) - 1e-9)
    if rank > n:
        raise CalibrationError(
            f"A false-positive rate of {fpr:g} needs at least {min_calibration_scores(fpr)} "
            f"calibration scores of normal images; this detector has {n}. Ask for a higher rate "
            "or train with more normal images."
        )
    return float(scores[max(rank, 1) - 1])


def flag_rate(scores: np.ndarray, threshold: float) -> float:
    """The share of ``scores`` above ``threshold`` (NaN for no scores)."""
    scores = np.asarray(scores, np.float64)
    return float(np.mean(scores > threshold)) if scores.size else float("nan")


def holdout_split(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``count`` normal training images into (kept, held out) index arrays.

    Raises:
      CalibrationError: ``fraction`` is outside [0, 1) or leaves no image to train on.
    """
    if not 0.0 <= fraction < 1.0:
        raise CalibrationError(f"The held-out fraction must lie in [0, 1), got {fraction}.")
    held = 0 if fraction == 0 else max(1, round(fraction * count))
    if held >= count:
        raise CalibrationError(
            f"Holding out {held} of {count} normal training images leaves none to train on; "
            "lower config.calibration_holdout."
        )
    order = np.random.default_rng([seed, 314159]).permutation(count)
    return np.sort(order[held:]), np.sort(order[:held])
