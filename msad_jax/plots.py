"""Plots of a run: ROC curve, score histograms, and loss / ROC-AUC per epoch (PNG files).

Built on :class:`matplotlib.figure.Figure`, not pyplot: no display needed, and a notebook's
backend is left alone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from msad_jax import metrics


def _save(fig: Figure, path: str | os.PathLike) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return os.fspath(path)


def _axes(figsize: tuple[float, float], columns: int = 1):
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(1, columns)


def plot_roc(labels: np.ndarray, scores: np.ndarray, path: str | os.PathLike, title: str) -> str:
    """ROC curve of raw scores (label 1 = anomaly) with its AUC in the legend."""
    fpr, tpr, _ = metrics.roc_curve(labels, scores)
    auc = metrics.roc_auc(labels, scores)
    fig, ax = _axes((4.5, 4.5))
    ax.plot(fpr, tpr, label=f"ROC-AUC {100 * auc:.2f}%")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_score_histograms(
    labels: np.ndarray,
    scores: np.ndarray,
    path: str | os.PathLike,
    title: str,
    threshold: float | None = None,
) -> str:
    """Histograms of the scores of normal and anomalous test images (and the threshold)."""
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    bins = np.histogram_bin_edges(scores, bins=50)
    fig, ax = _axes((6, 4))
    ax.hist(scores[labels == 0], bins=bins, alpha=0.6, density=True, label="normal")
    ax.hist(scores[labels == 1], bins=bins, alpha=0.6, density=True, label="anomalous")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label="threshold")
    ax.set(xlabel="anomaly score (sum of squared kNN distances)", ylabel="density", title=title)
    ax.legend()
    return _save(fig, path)


def plot_training_curves(
    epochs: Sequence[int],
    auroc: Sequence[float],
    loss_epochs: Sequence[int],
    loss: Sequence[float],
    path: str | os.PathLike,
    title: str,
) -> str:
    """Mean training loss per epoch and ROC-AUC per evaluated epoch (0 = pretrained)."""
    fig, (left, right) = _axes((9, 3.6), columns=2)
    left.plot(loss_epochs, loss, marker="o")
    left.set(xlabel="epoch", ylabel="mean training loss", title="loss")
    right.plot(epochs, 100 * np.asarray(auroc, dtype=float), marker="o", color="C1")
    right.set(xlabel="epoch (0 = pretrained)", ylabel="ROC-AUC (%)", title="kNN ROC-AUC")
    fig.suptitle(title)
    return _save(fig, path)
