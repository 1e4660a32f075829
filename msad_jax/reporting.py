"""Reports in Markdown and CSV: one class's run, and per-class tables with the published means.

Metrics are fractions in ``[0, 1]``, shown as percentages. Published values that SPEC section 9
calls approximate (DN2, CatsVsDogs, Fashion-MNIST) are marked ``~`` (CSV: ``approximate=true``).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from msad_jax import calibration
from msad_jax.data import tfds_sources

DATASETS: dict[str, str] = {
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100 (20 superclasses)",
    "fashion_mnist": "Fashion-MNIST",
    "cats_vs_dogs": "CatsVsDogs",
    "mvtec": "MVTec AD",
}
"""Dataset keys and display names."""

NUM_CLASSES: dict[str, int] = {
    **{name: len(spec.class_names) for name, spec in tfds_sources.SPECS.items()},
    "mvtec": 15,  # the categories of MVTec AD
}
"""Number of one-class experiments whose mean is the published figure (SPEC section 8)."""


@dataclasses.dataclass(frozen=True)
class PublishedResult:
    """A published mean ROC-AUC (in percent) for one method on one dataset."""

    method: str
    backbone: str
    mean_auroc: float
    approximate: bool = False
    note: str = ""


_PUBLISHED_ROWS = (  # SPEC section 9, columns in the order of DATASETS; None where it has '-'
    ("DN2", "ResNet-152", (92.5, 89.3, 94.5, 97.5, None)),
    ("PANDA", "ResNet-152", (96.2, 94.1, 95.6, 97.3, 86.5)),
    ("CSI", "ResNet-18 (from scratch)", (94.3, 89.6, None, None, None)),
    ("MSC", "ResNet-152", (98.6, 96.5, 94.2, 99.3, 87.2)),
    ("Transformaly", "ViT-B/16", (98.3, 97.3, 94.4, None, None)),
    ("FITYMI", "ViT-B/16", (99.1, 98.1, None, None, None)),
)
_NOTES = {
    ("MSC", "cifar10"): "AAAI 2023; 97.5 in arXiv v1",
    ("MSC", "cats_vs_dogs"): "approximate, unverified",
}


def _published(key: str) -> tuple[PublishedResult, ...]:
    """The published entries of one dataset; DN2 and two datasets come from secondary tables."""
    column = list(DATASETS).index(key)
    entries = []
    for method, backbone, values in _PUBLISHED_ROWS:
        if values[column] is not None:
            approximate = method == "DN2" or key in ("cats_vs_dogs", "fashion_mnist")
            default = "approximate (secondary table)" if approximate else ""
            note = _NOTES.get((method, key), default)
            entries.append(PublishedResult(method, backbone, values[column], approximate, note))
    return tuple(entries)


PUBLISHED: dict[str, tuple[PublishedResult, ...]] = {key: _published(key) for key in DATASETS}
"""Published mean ROC-AUC (%) per dataset key, from SPEC section 9."""

DEFAULT_METHODS: tuple[str, ...] = ("MSC", "DN2", "PANDA")
"""Published methods shown by default (the ones with a ResNet-152 backbone)."""


@dataclasses.dataclass(frozen=True)
class ClassResult:
    """Results of one one-class experiment.

    Attributes:
      index: class index in the dataset.
      name: class name.
      auroc: final ROC-AUC, a fraction in ``[0, 1]``.
      metrics: other metrics by name (fractions in ``[0, 1]``), e.g. ``{"average_precision": 0.9,
        "fpr_at_95_tpr": 0.2}``.
      epoch_auroc: optional ROC-AUC after each epoch (index 0 = before training).
    """

    index: int
    name: str
    auroc: float
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)
    epoch_auroc: Sequence[float] | None = None


def published_results(
    dataset: str, methods: Sequence[str] | None = DEFAULT_METHODS
) -> tuple[PublishedResult, ...]:
    """Published means for ``dataset`` (in the order of ``methods``; all methods if None)."""
    entries = PUBLISHED.get(dataset, ())
    if methods is None:
        return entries
    return tuple(e for m in methods for e in entries if e.method == m)


def _check_dataset(dataset: str) -> None:
    if not dataset or not dataset.strip():
        raise ValueError("dataset name is empty; pass e.g. 'cifar10' or the name of your data")


def display_name(dataset: str) -> str:
    """Display name of a dataset key (the key itself for datasets without published numbers)."""
    return DATASETS.get(dataset, dataset)


def _check_fraction(value: float, what: str) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{what} must be a fraction in [0, 1], got {value!r}")


def _validated(results: Sequence[ClassResult]) -> tuple[list[ClassResult], list[str], int]:
    """Sorts results by class index and checks them; returns (results, metric names, epochs)."""
    if not results:
        raise ValueError("no class results given; pass at least one ClassResult")
    ordered = sorted(results, key=lambda r: r.index)
    indices = [r.index for r in ordered]
    if len(set(indices)) != len(indices):
        raise ValueError(f"duplicate class indices in results: {indices}")
    metric_names = list(ordered[0].metrics)
    epochs = len(ordered[0].epoch_auroc) if ordered[0].epoch_auroc is not None else 0
    for r in ordered:
        _check_fraction(r.auroc, f"auroc of class {r.index}")
        if list(r.metrics) != metric_names:
            raise ValueError(
                f"class {r.index} has metrics {list(r.metrics)}, expected {metric_names}; "
                "give every class the same metrics"
            )
        for name, value in r.metrics.items():
            _check_fraction(value, f"{name} of class {r.index}")
        r_epochs = len(r.epoch_auroc) if r.epoch_auroc is not None else 0
        if r_epochs != epochs:
            raise ValueError(
                f"class {r.index} has {r_epochs} per-epoch AUROCs, expected {epochs}; "
                "give every class the same epochs"
            )
        for e, value in enumerate(r.epoch_auroc or ()):
            _check_fraction(value, f"epoch {e} auroc of class {r.index}")
    return ordered, metric_names, epochs


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def _pct(value: float, decimals: int) -> str:
    return f"{100.0 * value:.{decimals}f}"


def _ours_note(dataset: str, n_classes: int) -> str:
    expected = NUM_CLASSES.get(dataset)
    if expected is None or n_classes == expected:
        return f"mean of {n_classes} classes"
    return f"partial: mean of {n_classes} of {expected} classes, not comparable"


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown_report(
    dataset: str,
    results: Sequence[ClassResult],
    *,
    method: str = "ours (msad_jax)",
    backbone: str = "ResNet-152",
    methods: Sequence[str] | None = DEFAULT_METHODS,
    decimals: int = 1,
) -> str:
    """Markdown report: per-class table with a mean row, per-epoch AUROC, and published means.

    Args:
      dataset: dataset key (see :data:`DATASETS`; others are shown without published numbers).
      results: one :class:`ClassResult` per class.
      method: label of our row in the comparison table.
      backbone: our backbone, shown in the comparison table.
      methods: published methods to list (None: all of SPEC section 9 for this dataset).
      decimals: decimals of the percentages.

    Returns:
      Markdown text ending with a newline.

    Raises:
      ValueError: for an empty dataset name or inconsistent/out-of-range results.
    """
    _check_dataset(dataset)
    ordered, metric_names, epochs = _validated(results)
    lines = [f"## {display_name(dataset)}: one-class results (%)", ""]

    header = ["class", "name", "ROC-AUC", *metric_names]
    lines += [_md_row(header), _md_row(["---:", "---", *["---:"] * (len(header) - 2)])]
    for r in ordered:
        cells = [str(r.index), r.name, _pct(r.auroc, decimals)]
        cells += [_pct(r.metrics[m], decimals) for m in metric_names]
        lines.append(_md_row(cells))
    mean_cells = ["", "**mean**", f"**{_pct(_mean([r.auroc for r in ordered]), decimals)}**"]
    mean_cells += [_pct(_mean([r.metrics[m] for r in ordered]), decimals) for m in metric_names]
    lines += [_md_row(mean_cells), ""]

    if epochs:
        lines += ["### ROC-AUC per epoch (%; epoch 0 = before training)", ""]
        header = ["class", "name", *[str(e) for e in range(epochs)]]
        lines += [_md_row(header), _md_row(["---:", "---", *["---:"] * epochs])]
        for r in ordered:
            lines.append(
                _md_row([str(r.index), r.name, *[_pct(v, decimals) for v in r.epoch_auroc or ()]])
            )
        means = [_mean([r.epoch_auroc[e] for r in ordered]) for e in range(epochs)]
        lines += [_md_row(["", "**mean**", *[_pct(v, decimals) for v in means]]), ""]

    ours = 100.0 * _mean([r.auroc for r in ordered])
    lines += [
        "### Mean ROC-AUC (%) beside the published numbers",
        "",
        _md_row(["method", "backbone", "mean ROC-AUC", "ours - published", "note"]),
        _md_row(["---", "---", "---:", "---:", "---"]),
        _md_row([method, backbone, f"{ours:.{decimals}f}", "", _ours_note(dataset, len(ordered))]),
    ]
    for p in published_results(dataset, methods):
        mark = "~" if p.approximate else ""
        lines.append(
            _md_row(
                [
                    f"{p.method} (published)",
                    p.backbone,
                    f"{mark}{p.mean_auroc:.1f}",
                    f"{ours - p.mean_auroc:+.{decimals}f}",
                    p.note,
                ]
            )
        )
    lines += ["", "`~`: approximate published value (SPEC section 9).", ""]
    return "\n".join(lines)


def csv_report(
    dataset: str,
    results: Sequence[ClassResult],
    *,
    method: str = "ours (msad_jax)",
    backbone: str = "ResNet-152",
    methods: Sequence[str] | None = DEFAULT_METHODS,
) -> str:
    """CSV report: one row per class, a mean row, then one row per published mean.

    Raises:
      ValueError: for an empty dataset name or inconsistent/out-of-range results.
    """
    _check_dataset(dataset)
    ordered, metric_names, epochs = _validated(results)
    fields = ["kind", "dataset", "index", "name", "method", "backbone", "auroc_pct"]
    fields += [f"{m}_pct" for m in metric_names]
    fields += [f"auroc_epoch_{e}_pct" for e in range(epochs)]
    fields += ["approximate", "note"]

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    common = {"dataset": dataset, "method": method, "backbone": backbone}
    for r in ordered:
        row = {**common, "kind": "class", "index": r.index, "name": r.name}
        row["auroc_pct"] = repr(100.0 * r.auroc)
        row.update({f"{m}_pct": repr(100.0 * r.metrics[m]) for m in metric_names})
        row.update(
            {f"auroc_epoch_{e}_pct": repr(100.0 * v) for e, v in enumerate(r.epoch_auroc or ())}
        )
        row["approximate"] = "false"
        writer.writerow(row)
    mean_row = {**common, "kind": "mean", "name": "mean", "approximate": "false"}
    mean_row["auroc_pct"] = repr(100.0 * _mean([r.auroc for r in ordered]))
    mean_row.update(
        {f"{m}_pct": repr(100.0 * _mean([r.metrics[m] for r in ordered])) for m in metric_names}
    )
    for e in range(epochs):
        mean_row[f"auroc_epoch_{e}_pct"] = repr(100.0 * _mean([r.epoch_auroc[e] for r in ordered]))
    mean_row["note"] = _ours_note(dataset, len(ordered))
    writer.writerow(mean_row)
    for p in published_results(dataset, methods):
        writer.writerow(
            {
                "kind": "published",
                "dataset": dataset,
                "name": "mean",
                "method": p.method,
                "backbone": p.backbone,
                "auroc_pct": repr(p.mean_auroc),
                "approximate": "true" if p.approximate else "false",
                "note": p.note,
            }
        )
    return buffer.getvalue()


def write_report(
    dataset: str,
    results: Sequence[ClassResult],
    path_prefix: str | Path,
    **kwargs: object,
) -> tuple[Path, Path]:
    """Writes ``<path_prefix>.md`` and ``<path_prefix>.csv`` (parent folders are created).

    Args:
      dataset: dataset key.
      results: per-class results.
      path_prefix: output path without extension.
      **kwargs: ``method``, ``backbone`` and ``methods`` for both reports (``decimals`` is Markdown
        only).

    Returns:
      The two paths written (Markdown, CSV).
    """
    prefix = Path(path_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    md_path = prefix.with_name(prefix.name + ".md")
    csv_path = prefix.with_name(prefix.name + ".csv")
    md_path.write_text(markdown_report(dataset, results, **kwargs))  # type: ignore[arg-type]
    csv_kwargs = {k: v for k, v in kwargs.items() if k != "decimals"}
    csv_path.write_text(csv_report(dataset, results, **csv_kwargs))  # type: ignore[arg-type]
    return md_path, csv_path


def _threshold_markdown(calibrated: Mapping[str, Any]) -> str:
    source = {
        calibration.LEAVE_ONE_OUT: "leave-one-out scores of the {n} normal training images",
        calibration.HOLDOUT: "{n} normal training images held out from training and gallery",
    }[calibrated["method"]].format(n=calibrated["calibration_images"])
    return (
        f"Threshold {calibrated['threshold']:.6g}, set for a false-positive rate of "
        f"{100 * calibrated['target_fpr']:.3g}% from the {source}. On the test images it flags "
        f"{100 * calibrated['test_fpr']:.2f}% of the normal ones (false positives) and "
        f"{100 * calibrated['test_recall']:.2f}% of the anomalous ones."
    )


def class_markdown(report: Mapping[str, Any]) -> str:
    """``report.md`` of one class: its recipe, evaluation history and threshold.

    Args:
      report: the class's report (what ``report.json`` holds).
    """
    lines = [
        f"# {report['dataset']}: normal class {report['normal_class']} ({report['class_name']})",
        "",
        f"Backbone {report['backbone']}, loss {report['loss']}"
        f"{' + angular' if report['angular'] else ''}, {report['epochs']} epochs. "
        f"Counts: {report['counts']}.",
        "",
        "| epoch | ROC-AUC % | AP % | FPR@95TPR % | mean loss |",
        "|---|---|---|---|---|",
    ]
    for h in report["history"]:
        if "auroc" not in h:
            continue
        loss = "" if h.get("mean_loss") is None else f"{h['mean_loss']:.4f}"
        lines.append(
            f"| {h['epoch']} | {100 * h['auroc']:.2f} | {100 * h['average_precision']:.2f} | "
            f"{100 * h['fpr_at_95_tpr']:.2f} | {loss} |"
        )
    lines += ["", _threshold_markdown(report["calibration"]), ""]
    return "\n".join(lines)
