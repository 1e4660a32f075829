"""Tables (Markdown), log lines and plots of a conditioning study's results."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 -- the backend must be chosen first.

LABELS = {"contrastive": "standard", "msc": "MSC"}

Column = tuple[str, str, Callable[[Any], str]]


def _num(digits: int) -> Callable[[Any], str]:
    def fmt(value: Any) -> str:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "" if value is None else str(value)
        return f"{value:.{digits}f}"

    return fmt


def _sci(value: Any) -> str:
    return "" if value is None else f"{value:.3g}"


def _percent(value: Any) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def _top(value: Any) -> str:
    return "" if not value else f"{value[0]:.3g}"


def label(loss: str) -> str:
    """Display name of a loss."""
    return LABELS.get(loss, loss)


def log_line(loss: str, record: dict[str, Any]) -> str:
    """One line summarising a record for the log."""
    return (
        f"{label(loss)} epoch {record['epoch']}: ROC-AUC {100 * record['auroc']:.2f}%  "
        f"compactness {record['compactness']:.4f}  uniformity phi {record['uniformity_phi']:.3f} "
        f"theta {record['uniformity_theta']:.3f}  |grad U|/|grad A| features "
        f"{record['feat_ratio']:.3g} params {record['param_ratio']:.3g}  drift/step "
        f"{record['radial_drift']:.3g}  Hessian cond {record['hessian_condition']:.3g}"
    )


def paired_table(runs: dict[str, list[dict[str, Any]]], columns: Sequence[Column]) -> list[str]:
    """Markdown rows: one per epoch, for each column one cell per loss.

    Args:
      runs: loss -> per-epoch records (epoch 0 first).
      columns: ``(key, title, formatter)`` triples.

    Returns:
      The table's lines.
    """
    losses = list(runs)
    header = ["epoch"] + [f"{title} ({label(loss)})" for _, title, _ in columns for loss in losses]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    epochs = sorted({r["epoch"] for records in runs.values() for r in records})
    by_epoch = {loss: {r["epoch"]: r for r in records} for loss, records in runs.items()}
    for epoch in epochs:
        cells = [str(epoch)]
        for key, _, fmt in columns:
            for loss in losses:
                record = by_epoch[loss].get(epoch)
                cells.append(fmt(record.get(key)) if record else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


GEOMETRY_COLUMNS: tuple[Column, ...] = (
    ("auroc", "ROC-AUC %", _percent),
    ("compactness", "compactness", _num(4)),
    ("center_norm", "norm of mean phi", _num(4)),
    ("uniformity_phi", "uniformity phi", _num(3)),
    ("uniformity_theta", "uniformity theta", _num(3)),
    ("train_loss", "train loss", _num(4)),
)
GRADIENT_COLUMNS: tuple[Column, ...] = (
    ("feat_ratio", "U/A features", _sci),
    ("feat_cosine", "cos(A,U) features", _num(3)),
    ("param_ratio", "U/A params", _sci),
    ("param_cosine", "cos(A,U) params", _num(3)),
    ("radial_drift", "drift per step", _sci),
    ("positive_cos", "view cosine in z", _num(4)),
    ("positive_cos_phi", "view cosine in phi", _num(4)),
)
HESSIAN_COLUMNS: tuple[Column, ...] = (
    ("hessian_top", "top eigenvalue", _top),
    ("hessian_min", "min eigenvalue", _sci),
    ("hessian_condition", "condition number", _sci),
    ("hessian_negative", "negative", str),
)


def _end_points(results: dict[str, Any]) -> list[str]:
    lines = [
        "| loss | epoch | ROC-AUC % | compactness | uniformity phi | uniformity theta |",
        "|---|---|---|---|---|---|",
    ]
    for loss, records in results["runs"].items():
        for record in (records[0], records[-1]) if len(records) > 1 else records:
            lines.append(
                f"| {label(loss)} | {record['epoch']} | {_percent(record['auroc'])} | "
                f"{record['compactness']:.4f} | {record['uniformity_phi']:.3f} | "
                f"{record['uniformity_theta']:.3f} |"
            )
    return lines


def markdown(results: dict[str, Any]) -> str:
    """The study's report: setup, end points and the per-epoch tables."""
    config = results["config"]
    prep = results["preprocessing"]
    counts = results["counts"]
    seconds = results.get("seconds", {}).get("total")
    lines = [
        f"# Conditioning study: {results['dataset']}, normal class {results['normal_class']} "
        f"({results['class_name']})",
        "",
        f"Backbone {config['backbone']} (pretrained={config['pretrained']}), input "
        f"{prep['size']} px (resize {prep['resize']}, crop {prep['crop']}, {prep['method']}), "
        f"frozen {results['frozen'] or 'nothing'}; SGD lr {config['learning_rate']:g}, weight "
        f"decay {config['weight_decay']:g}, batch {config['batch_size']}, temperature "
        f"{config['temperature']:g}, {results['steps_per_epoch']} steps per epoch; seed "
        f"{config['seed']}. Images: {counts['train']} train, {counts['test']} test "
        f"({counts['test_normal']} normal). Norm of the pretrained center: "
        f"{results['center_norm']:.4f}."
        + (f" Wall time {seconds / 60:.1f} min." if seconds else ""),
        "",
        "Probe: the loss split, gradients (U = uniformity, A = alignment), drift and Hessian are "
        f"measured on a fixed batch of {config['probe_size']} training images with fixed views, "
        f"each run with its own loss; Hessian on {config['hessian_size']} of them.",
        "",
        "## End points",
        "",
        *_end_points(results),
        "",
        "## kNN and geometry of the training features",
        "",
        *paired_table(results["runs"], GEOMETRY_COLUMNS),
        "",
        "## Gradient balance on the probe batch",
        "",
        *paired_table(results["runs"], GRADIENT_COLUMNS),
        "",
        "## Tangent feature Hessian of the loss",
        "",
        *paired_table(results["runs"], HESSIAN_COLUMNS),
        "",
    ]
    return "\n".join(lines)


PANELS: tuple[tuple[str, str, bool], ...] = (
    ("auroc", "kNN ROC-AUC", False),
    ("compactness", "compactness (mean cos to c)", False),
    ("uniformity_phi", "uniformity of phi", False),
    ("uniformity_theta", "uniformity of theta", False),
    ("feat_ratio", "|grad U| / |grad A| (features)", True),
    ("param_ratio", "|grad U| / |grad A| (params)", True),
    ("radial_drift", "d compactness per step", False),
    ("hessian_condition", "Hessian condition number", True),
)


def plot(results: dict[str, Any], path: str | os.PathLike) -> str:
    """Per-epoch curves of the main quantities, one line per loss."""
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, (key, title, log) in zip(axes.ravel(), PANELS, strict=True):
        for loss, records in results["runs"].items():
            epochs = [r["epoch"] for r in records]
            values = [r.get(key) for r in records]
            if key == "auroc":
                values = [100 * v for v in values]
            ax.plot(epochs, values, marker="o", label=label(loss))
        if log:
            ax.set_yscale("log")
        ax.set(title=title, xlabel="epoch (0 = pretrained)")
        ax.grid(alpha=0.3)
    axes[0, 0].legend()
    config = results["config"]
    fig.suptitle(
        f"{results['dataset']} class {results['normal_class']} ({results['class_name']}), "
        f"{config['backbone']}, lr {config['learning_rate']:g}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.fspath(path)
