"""What a finished run leaves in its workdir: the threshold, the reports and the detector file."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_collections
import numpy as np

from msad_jax import calibration, evaluation, knn, plots, reporting
from msad_jax.data.protocols import OneClassData
from msad_jax.run_files import (
    DETECTOR_FILE,
    flatten_variables,
    write_atomically,
    write_detector_file,
)

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Threshold:
    """The decision threshold of a finished class and what it was set from.

    Attributes:
      value: flag ``score > value``.
      target_fpr: the false-positive rate it was set for.
      method: ``calibration.LEAVE_ONE_OUT`` or ``calibration.HOLDOUT``.
      scores: the calibration scores it was set from.
      train_scores: the leave-one-out scores of the gallery.
    """

    value: float
    target_fpr: float
    method: str
    scores: np.ndarray
    train_scores: np.ndarray


def set_threshold(
    config: ml_collections.ConfigDict, gallery: np.ndarray, holdout_features: np.ndarray | None
) -> Threshold:
    """The threshold at ``config.threshold_fpr`` from held-out features, else leave-one-out."""
    budget = config.knn_memory_budget_mb * 2**20
    train_scores = evaluation.leave_one_out_scores(
        gallery, config.knn_k, memory_budget_bytes=budget
    )
    method, scores = calibration.LEAVE_ONE_OUT, train_scores
    if holdout_features is not None:
        held = knn.knn_scores(gallery, holdout_features, config.knn_k, memory_budget_bytes=budget)
        method, scores = calibration.HOLDOUT, np.asarray(held, np.float64)
    fpr = float(config.threshold_fpr)
    value = calibration.threshold_at_fpr(scores, fpr)
    return Threshold(value, fpr, method, scores, train_scores)


def class_report(
    config: ml_collections.ConfigDict,
    data: OneClassData,
    final: evaluation.Evaluation,
    history: list[dict[str, Any]],
    step: int,
    threshold: Threshold,
) -> dict[str, Any]:
    """The report of a finished class (``report.json``); ``step``: the checkpoint it describes."""
    evals = [h for h in history if "auroc" in h]
    normal = np.asarray(final.labels) == 0
    return {
        "dataset": config.dataset,
        "normal_class": data.normal_class,
        "class_name": data.normal_class_name,
        "backbone": config.backbone,
        "loss": config.loss,
        "angular": config.angular,
        "epochs": config.epochs,
        "counts": data.counts(),
        "pretrained": {k: evals[0][k] for k in ("auroc", "average_precision", "fpr_at_95_tpr")},
        "final": dict(final.metrics),
        "history": history,
        "threshold": threshold.value,
        "threshold_quantile": 1.0 - threshold.target_fpr,  # the name of earlier versions
        "calibration": {
            "target_fpr": threshold.target_fpr,
            "method": threshold.method,
            "calibration_images": len(threshold.scores),
            "threshold": threshold.value,
            "test_fpr": calibration.flag_rate(final.scores[normal], threshold.value),
            "test_recall": calibration.flag_rate(final.scores[~normal], threshold.value),
        },
        "checkpoint_step": step,
    }


def write_class_outputs(
    workdir: str,
    config: ml_collections.ConfigDict,
    data: OneClassData,
    final: evaluation.Evaluation,
    report: dict[str, Any],
    threshold: Threshold,
    variables: PyTree,
) -> None:
    """Writes the detector file, the reports and the plots of a finished class."""
    write_detector_file(
        os.path.join(workdir, DETECTOR_FILE),
        {
            "gallery": final.gallery,
            "train_scores": threshold.train_scores,
            "calibration_scores": threshold.scores,
            "calibration": np.asarray(threshold.method),
            "target_fpr": np.asarray(threshold.target_fpr),
            "test_scores": final.scores,
            "test_labels": final.labels,
            "threshold": np.asarray(threshold.value),
            "image_side": np.asarray(data.train_images.shape[1]),
            "knn_k": np.asarray(config.knn_k),
            "checkpoint_step": np.asarray(report["checkpoint_step"]),
            **flatten_variables(variables),
        },
    )
    write_atomically(os.path.join(workdir, "report.json"), json.dumps(report, indent=2))
    write_atomically(os.path.join(workdir, "report.md"), reporting.class_markdown(report))
    if not config.plots:
        return
    title = f"{config.dataset} class {data.normal_class} ({data.normal_class_name})"
    plots.plot_roc(final.labels, final.scores, os.path.join(workdir, "roc.png"), title)
    plots.plot_score_histograms(
        final.labels,
        final.scores,
        os.path.join(workdir, "scores.png"),
        title,
        threshold=threshold.value,
    )
    evals = [h for h in report["history"] if "auroc" in h]
    trained = [h for h in report["history"] if h.get("mean_loss") is not None]
    plots.plot_training_curves(
        [h["epoch"] for h in evals],
        [h["auroc"] for h in evals],
        [h["epoch"] for h in trained],
        [h["mean_loss"] for h in trained],
        os.path.join(workdir, "training.png"),
        title,
    )


def dataset_summary(
    config: ml_collections.ConfigDict, reports: list[dict[str, Any]]
) -> dict[str, Any]:
    """The summary of a ``normal_class='all'`` run (``report.json`` beside the class folders)."""
    return {
        "dataset": config.dataset,
        "classes": reports,
        "mean_auroc": float(np.mean([r["final"]["auroc"] for r in reports])),
        "mean_pretrained_auroc": float(np.mean([r["pretrained"]["auroc"] for r in reports])),
        "report_markdown": "report.md",
        "report_csv": "report.csv",
    }


def write_dataset_outputs(workdir: str, config: ml_collections.ConfigDict, summary: dict) -> None:
    """Writes the per-class table (``report.md``, ``report.csv``) and ``report.json``."""
    results = [
        reporting.ClassResult(
            index=r["normal_class"],
            name=r["class_name"],
            auroc=r["final"]["auroc"],
            metrics={
                "pretrained_auroc": r["pretrained"]["auroc"],
                "average_precision": r["final"]["average_precision"],
                "fpr_at_95_tpr": r["final"]["fpr_at_95_tpr"],
            },
            epoch_auroc=[h["auroc"] for h in r["history"] if "auroc" in h],
        )
        for r in summary["classes"]
    ]
    reporting.write_report(
        config.dataset, results, os.path.join(workdir, "report"), backbone=config.backbone
    )
    write_atomically(os.path.join(workdir, "report.json"), json.dumps(summary, indent=2))
