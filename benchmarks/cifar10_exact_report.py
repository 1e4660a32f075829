"""Report of the exact-pixel CIFAR-10 benchmark, generated from its JSON records only.

Reads ``<results>/records/*.json`` (one per run, written by ``cifar10_exact.py``) and
``<results>/epoch0/*.json`` (``cifar10_exact_epoch0.py``) and writes

* ``<results>.md`` (``benchmarks/results/cifar10_exact.md``): the epoch-0 preprocessing table, the
  pilot runs (``<results>/pilot/*.json``), the per-class and mean table (pretrained kNN = epoch 0,
  MSC and standard contrastive after the last epoch), the same at the published learning rate, the
  seeds, MSC's gain with training views made on the device vs with Pillow (class x seed x views,
  means, standard deviations, a paired t-test of the difference), the ROC-AUC after every epoch
  of every run, the agreement of the JAX runs with the PyTorch
  reference trained on the same views (max and mean absolute difference of ROC-AUC per epoch, in
  points), compactness, time and load;
* the README's real-data section, between the markers ``<!-- cifar10_exact:begin -->`` and
  ``<!-- cifar10_exact:end -->`` (unless ``--no_readme``).

Nothing here is measured: every number comes from a record. A mean over classes only counts the
classes that have all the numbers of its row. The tables other than the views comparison and the
per-run lists use the runs with device views only (``augment`` absent or ``'device'``).

Usage (repository root)::

    python benchmarks/cifar10_exact_report.py
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import textwrap
from collections.abc import Iterable, Sequence
from typing import Any

import exact_cifar
import numpy as np
from scipy import stats

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = REPO / "benchmarks" / "results" / "cifar10_exact"
README = REPO / "README.md"
BEGIN = "<!-- cifar10_exact:begin -->"
END = "<!-- cifar10_exact:end -->"
METHODS = ("msc", "contrastive")
TITLES = {"msc": "MSC", "contrastive": "standard contrastive"}
VARIANT_TITLES = {
    "crop": "resize 256 + centre crop 224, bicubic (registry default)",
    "resize_bicubic": "resize to 224, bicubic, float",
    "resize_bilinear": "resize to 224, bilinear, float",
    "resize_bicubic_uint8": "resize to 224, Pillow bicubic rounded to uint8",
}
AUGMENT_TITLES = {"device": "device", "pil": "Pillow"}
PIPELINE_CLASSES = (0, 3, 8)  # the views comparison of cifar10_exact.py (MSC, the grid's rate)
PIPELINE_SEEDS = (0, 1, 2)
SIGNIFICANCE = 0.05  # two-sided level at which a difference counts as beyond the seed noise
COMMAND = "python benchmarks/cifar10_exact.py"
CHOSEN_VARIANT = "resize_bicubic"  # the evaluation transform of configs/cifar10_exact_*.py


# --------------------------------------------------------------------------------------------
# Reading.


def load_records(directory: pathlib.Path) -> list[dict[str, Any]]:
    """Every ``*.json`` record in ``directory`` (sorted by file name; none if it is missing)."""
    if not directory.is_dir():
        return []
    out = []
    for path in sorted(directory.glob("*.json")):
        try:
            out.append(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as err:
            raise ValueError(f"Record {path} is damaged ({err}); delete or restore it.") from None
    return out


def pct(x: float | None, digits: int = 2) -> str:
    """A fraction as a percentage ('' when missing)."""
    return "" if x is None else f"{100 * x:.{digits}f}"


def points(x: float | None, digits: int = 2) -> str:
    """A fraction difference in percentage points with its sign ('' when missing)."""
    return "" if x is None else f"{100 * x:+.{digits}f}"


def find(records: Iterable[dict[str, Any]], **want: Any) -> dict[str, Any] | None:
    """The record whose fields equal ``want`` (learning rates compared to 1e-12 relative)."""
    for record in records:
        ok = True
        for key, value in want.items():
            got = record.get(key)
            if isinstance(value, float):
                ok &= got is not None and abs(got - value) <= 1e-12 * abs(value)
            else:
                ok &= got == value
        if ok:
            return record
    return None


def augment_of(record: dict[str, Any]) -> str:
    """Where a run's training views were made: ``'device'`` (also every record made before the
    option existed) or ``'pil'``."""
    return record.get("augment") or (record.get("spec") or {}).get("augment") or "device"


# --------------------------------------------------------------------------------------------
# Tables as data (tested against NumPy).


def method_table(
    records: Sequence[dict[str, Any]], *, lr: float, seed: int = 0, implementation: str = "jax"
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-class rows (pretrained = epoch 0 of the MSC run, else of the contrastive run; final
    ROC-AUC per method) and the means over the classes that have all three numbers."""
    classes = sorted(
        {
            (r["normal_class"], r["class_name"])
            for r in records
            if r["implementation"] == implementation
            and r["seed"] == seed
            and abs(r["learning_rate"] - lr) <= 1e-12 * lr
        }
    )
    rows = []
    for index, name in classes:
        row: dict[str, Any] = {"normal_class": index, "class_name": name}
        for method in METHODS:
            record = find(
                records,
                implementation=implementation,
                normal_class=index,
                method=method,
                learning_rate=lr,
                seed=seed,
            )
            if record is not None:
                row[method] = record["auroc"][-1]
                row.setdefault("pretrained", record["auroc"][0])
                row[f"{method}_epochs"] = len(record["auroc"]) - 1
        rows.append(row)
    complete = [r for r in rows if all(k in r for k in ("pretrained", *METHODS))]
    means: dict[str, Any] = {"classes": len(complete)}
    if complete:
        for key in ("pretrained", *METHODS):
            means[key] = float(np.mean([r[key] for r in complete]))
    return rows, means


def agreement(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """JAX vs PyTorch reference runs of the same (class, method, lr, seed), epoch by epoch.

    Returns one entry per pair with ``max_abs``/``mean_abs`` (fractions) over the epochs both
    have (epoch 0 included) and the two curves.
    """
    out = []
    for torch_record in records:
        if torch_record["implementation"] != "torch":
            continue
        jax_record = find(
            records,
            implementation="jax",
            backbone=torch_record["backbone"],
            normal_class=torch_record["normal_class"],
            method=torch_record["method"],
            learning_rate=torch_record["learning_rate"],
            seed=torch_record["seed"],
        )
        if jax_record is None:
            continue
        n = min(len(jax_record["auroc"]), len(torch_record["auroc"]))
        diff = np.abs(np.asarray(jax_record["auroc"][:n]) - np.asarray(torch_record["auroc"][:n]))
        out.append(
            {
                "normal_class": torch_record["normal_class"],
                "class_name": torch_record["class_name"],
                "method": torch_record["method"],
                "learning_rate": torch_record["learning_rate"],
                "seed": torch_record["seed"],
                "epochs": n - 1,
                "max_abs": float(diff.max()),
                "mean_abs": float(diff.mean()),
                "jax": jax_record["auroc"][:n],
                "torch": torch_record["auroc"][:n],
            }
        )
    return sorted(out, key=lambda e: (e["normal_class"], e["method"]))


def pooled_agreement(pairs: Sequence[dict[str, Any]]) -> dict[str, float] | None:
    """Max and mean absolute difference over every epoch of every pair (None without pairs)."""
    if not pairs:
        return None
    diffs = np.concatenate([np.abs(np.subtract(p["jax"], p["torch"])) for p in pairs])
    return {"max_abs": float(diffs.max()), "mean_abs": float(diffs.mean()), "n": int(len(diffs))}


def seed_pairs(records: Sequence[dict[str, Any]], *, lr: float) -> list[dict[str, Any]]:
    """Final ROC-AUC of seed 0 and each other seed, same (class, method, lr), JAX runs."""
    out = []
    for record in records:
        if record["implementation"] != "jax" or record["seed"] == 0:
            continue
        if abs(record["learning_rate"] - lr) > 1e-12 * lr:
            continue
        base = find(
            records,
            implementation="jax",
            normal_class=record["normal_class"],
            method=record["method"],
            learning_rate=record["learning_rate"],
            seed=0,
        )
        if base is not None:
            out.append(
                {
                    "normal_class": record["normal_class"],
                    "class_name": record["class_name"],
                    "method": record["method"],
                    "seed": record["seed"],
                    "seed0": base["auroc"][-1],
                    "other": record["auroc"][-1],
                    "seed0_pretrained": base["auroc"][0],
                    "other_pretrained": record["auroc"][0],
                }
            )
    return sorted(out, key=lambda e: (e["normal_class"], e["method"], e["seed"]))


def pipeline_rows(
    records: Sequence[dict[str, Any]],
    *,
    lr: float,
    classes: Sequence[int] = PIPELINE_CLASSES,
    seeds: Sequence[int] = PIPELINE_SEEDS,
) -> list[dict[str, Any]]:
    """One row per (class, seed, views) of the MSC runs at ``lr`` (JAX); a row without a record
    has no ``gain``. ``gain``: final minus epoch-0 ROC-AUC (fractions)."""
    names = dict(enumerate(exact_cifar.CLASS_NAMES))
    rows = []
    for c in classes:
        for seed in seeds:
            for augment in AUGMENT_TITLES:
                row: dict[str, Any] = {
                    "normal_class": c,
                    "class_name": names.get(c, "?"),
                    "seed": seed,
                    "augment": augment,
                }
                record = find(
                    [r for r in records if augment_of(r) == augment],
                    implementation="jax",
                    method="msc",
                    normal_class=c,
                    seed=seed,
                    learning_rate=lr,
                )
                if record is not None:
                    row["pretrained"] = record["auroc"][0]
                    row["final"] = record["auroc"][-1]
                    row["gain"] = row["final"] - row["pretrained"]
                    row["epochs"] = len(record["auroc"]) - 1
                rows.append(row)
    return rows


def _t_test(t: float, df: float) -> float:
    """Two-sided p-value of Student's t with ``df`` degrees of freedom."""
    return float(2.0 * stats.t.sf(abs(t), df))


def pipeline_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per views: runs, mean and SD (ddof 1) of the gain, mean final ROC-AUC; and the tests.

    ``paired``: the difference Pillow minus device of the gain per (class, seed) that has both
    runs; its mean, SD, standard error, t = mean / SE and the two-sided p-value with n - 1
    degrees of freedom (the class's own difficulty cancels in each pair). ``welch``: Welch's
    t-test of the two sets of gains, unpaired (class differences count as noise there). A test
    needs 2 values per side and a non-zero spread; ``beyond_noise``: p < ``SIGNIFICANCE``.
    """
    out: dict[str, Any] = {}
    gains: dict[str, np.ndarray] = {}
    for augment in AUGMENT_TITLES:
        measured = [r for r in rows if r["augment"] == augment and "gain" in r]
        g = np.asarray([r["gain"] for r in measured], np.float64)
        gains[augment] = g
        out[augment] = {
            "runs": len(g),
            "mean": float(g.mean()) if len(g) else None,
            "sd": float(g.std(ddof=1)) if len(g) > 1 else None,
            "mean_final": float(np.mean([r["final"] for r in measured])) if measured else None,
        }
    by_key = {(r["normal_class"], r["seed"], r["augment"]): r for r in rows if "gain" in r}
    pairs = [
        (by_key[(c, s, "pil")], by_key[(c, s, "device")])
        for (c, s, a) in sorted(by_key)
        if a == "pil" and (c, s, "device") in by_key
    ]
    d = np.asarray([p["gain"] - q["gain"] for p, q in pairs], np.float64)
    paired: dict[str, Any] = {
        "n": len(d),
        "differences": [
            {"normal_class": p["normal_class"], "seed": p["seed"], "difference": float(x)}
            for (p, _), x in zip(pairs, d, strict=True)
        ],
        "mean": float(d.mean()) if len(d) else None,
        "epoch0_max_abs": (
            max(abs(p["pretrained"] - q["pretrained"]) for p, q in pairs) if pairs else None
        ),
    }
    if len(d) > 1:
        paired["sd"] = float(d.std(ddof=1))
        paired["se"] = paired["sd"] / np.sqrt(len(d))
        if paired["se"] > 0:
            paired["t"] = paired["mean"] / paired["se"]
            paired["df"] = len(d) - 1
            paired["p"] = _t_test(paired["t"], paired["df"])
            paired["beyond_noise"] = paired["p"] < SIGNIFICANCE
    out["paired"] = paired
    a, b = gains["pil"], gains["device"]
    welch: dict[str, Any] = {"n_pil": len(a), "n_device": len(b)}
    if len(a) > 1 and len(b) > 1:
        va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
        if va + vb > 0:
            welch["difference"] = float(a.mean() - b.mean())
            welch["t"] = welch["difference"] / float(np.sqrt(va + vb))
            welch["df"] = float((va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)))
            welch["p"] = _t_test(welch["t"], welch["df"])
            welch["beyond_noise"] = welch["p"] < SIGNIFICANCE
    out["welch"] = welch
    return out


# --------------------------------------------------------------------------------------------
# Markdown.


def _table_lines(rows, means, *, with_epochs: bool = True) -> list[str]:
    lines = [
        "| class | name | pretrained kNN (epoch 0) | MSC | standard contrastive | "
        "MSC - kNN | contrastive - kNN |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        pre = row.get("pretrained")
        cells = [
            str(row["normal_class"]),
            row["class_name"],
            pct(pre),
            pct(row.get("msc")),
            pct(row.get("contrastive")),
            points(row["msc"] - pre) if "msc" in row and pre is not None else "",
            points(row["contrastive"] - pre) if "contrastive" in row and pre is not None else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if means["classes"]:
        counted = f"{means['classes']} class" + ("" if means["classes"] == 1 else "es")
        lines.append(
            f"| **mean** ({counted}) | | **{pct(means['pretrained'])}** | "
            f"**{pct(means['msc'])}** | **{pct(means['contrastive'])}** | "
            f"**{points(means['msc'] - means['pretrained'])}** | "
            f"**{points(means['contrastive'] - means['pretrained'])}** |"
        )
    if with_epochs:
        epochs = sorted({r[k] for r in rows for k in r if k.endswith("_epochs")})
        if epochs:
            lines += ["", f"Epochs of these runs: {', '.join(str(e) for e in epochs)}."]
    return lines


def epoch0_lines(epoch0: Sequence[dict[str, Any]]) -> list[str]:
    """Table of the epoch-0 preprocessing records."""
    if not epoch0:
        return ["(no epoch-0 records yet)"]
    header = [str(i) for i in range(len(epoch0[0]["classes"]))]
    lines = [
        "| backbone | preprocessing | " + " | ".join(header) + " | mean |",
        "|---|---|" + "---|" * len(header) + "---|",
    ]
    for record in sorted(epoch0, key=lambda r: (r["backbone"], -r["mean_auroc"])):
        cells = " | ".join(pct(c["auroc"]) for c in record["classes"])
        lines.append(
            f"| {record['backbone']} | {VARIANT_TITLES.get(record['variant'], record['variant'])}"
            f" | {cells} | **{pct(record['mean_auroc'])}** |"
        )
    return lines


def curve_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    """ROC-AUC after every epoch of every run (one row per run)."""
    if not records:
        return ["(no runs finished yet)"]
    width = max(len(r["auroc"]) for r in records)
    lines = [
        "| run | " + " | ".join(f"ep {e}" for e in range(width)) + " |",
        "|---|" + "---|" * width,
    ]
    order = sorted(
        records,
        key=lambda r: (
            r["implementation"] != "jax",
            -r["learning_rate"],
            r["seed"],
            r["normal_class"],
            r["method"],
        ),
    )
    for record in order:
        cells = [pct(a) for a in record["auroc"]] + [""] * (width - len(record["auroc"]))
        lines.append(f"| `{record['name']}` | " + " | ".join(cells) + " |")
    return lines


def loss_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    """Mean training loss of every epoch of every run."""
    if not records:
        return []
    width = max(len(r["history"]) for r in records)
    lines = [
        "| run | " + " | ".join(f"ep {e}" for e in range(1, width)) + " |",
        "|---|" + "---|" * (width - 1),
    ]
    for record in sorted(records, key=lambda r: r["name"]):
        cells = [
            "" if h.get("mean_loss") is None else f"{h['mean_loss']:.4f}"
            for h in record["history"][1:]
        ]
        cells += [""] * (width - 1 - len(cells))
        lines.append(f"| `{record['name']}` | " + " | ".join(cells) + " |")
    return lines


def agreement_lines(pairs: Sequence[dict[str, Any]]) -> list[str]:
    """Table of the JAX-vs-PyTorch comparisons and the pooled numbers."""
    if not pairs:
        return ["(no PyTorch reference run finished yet)"]
    pooled = pooled_agreement(pairs)
    lines = [
        f"Over all {len(pairs)} pairs and {pooled['n']} evaluated epochs (epoch 0 included): "
        f"max |JAX - PyTorch| = {100 * pooled['max_abs']:.2f} points, mean "
        f"{100 * pooled['mean_abs']:.2f} points of ROC-AUC.",
        "",
        "| class | method | lr | seed | epochs | max abs diff (points) | mean abs diff (points) | "
        "JAX per epoch | PyTorch per epoch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in pairs:
        lines.append(
            f"| {p['normal_class']} {p['class_name']} | {TITLES[p['method']]} | "
            f"{p['learning_rate']:g} | {p['seed']} | {p['epochs']} | {100 * p['max_abs']:.2f} | "
            f"{100 * p['mean_abs']:.2f} | {' '.join(pct(a) for a in p['jax'])} | "
            f"{' '.join(pct(a) for a in p['torch'])} |"
        )
    return lines


def seed_lines(pairs: Sequence[dict[str, Any]]) -> list[str]:
    """Final ROC-AUC per seed."""
    if not pairs:
        return ["(no second seed finished yet)"]
    lines = [
        "| class | method | seed 0 | other seed | which | difference (points) |",
        "|---|---|---|---|---|---|",
    ]
    for p in pairs:
        lines.append(
            f"| {p['normal_class']} {p['class_name']} | {TITLES[p['method']]} | {pct(p['seed0'])} |"
            f" {pct(p['other'])} | {p['seed']} | {points(p['other'] - p['seed0'])} |"
        )
    return lines


def pipeline_lines(rows: Sequence[dict[str, Any]], summary: dict[str, Any]) -> list[str]:
    """The views comparison: one row per run, the per-views summary and the tests."""
    lines = [
        "| class | seed | training views | epoch 0 | final | gain (points) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['normal_class']} {r['class_name']} | {r['seed']} | "
        head += f"{AUGMENT_TITLES[r['augment']]} | "
        if "gain" in r:
            lines.append(
                head + f"{pct(r['pretrained'])} | {pct(r['final'])} | {points(r['gain'])} |"
            )
        else:
            lines.append(head + "not measured yet | | |")
    lines += [
        "",
        "| training views | runs | mean gain (points) | SD of the gain (points) | mean final |",
        "|---|---|---|---|---|",
    ]
    for augment, title in AUGMENT_TITLES.items():
        s = summary[augment]
        sd = "" if s["sd"] is None else f"{100 * s['sd']:.2f}"
        lines.append(
            f"| {title} | {s['runs']} of {sum(r['augment'] == augment for r in rows)} | "
            f"{points(s['mean'])} | {sd} | {pct(s['mean_final'])} |"
        )
    paired, welch = summary["paired"], summary["welch"]
    lines.append("")
    if paired["n"] == 0:
        lines.append("No (class, seed) has both runs yet: no difference to test.")
        return lines
    diffs = ", ".join(
        f"class {e['normal_class']} seed {e['seed']} {points(e['difference'])}"
        for e in paired["differences"]
    )
    lines.append(
        f"Pillow minus device, gain per (class, seed) with both runs ({paired['n']} of "
        f"{len(rows) // 2}): {diffs}. Epoch 0 of the two runs of a pair differs by at most "
        f"{100 * paired['epoch0_max_abs']:.2f} points (same pretrained features and evaluation "
        "transform), so a difference of gains is a difference of final ROC-AUC."
    )
    lines.append("")
    if "p" not in paired:
        lines.append("Too few pairs for a test yet (it needs 2 with different differences).")
        return lines
    verdict = "beyond" if paired["beyond_noise"] else "within"
    lines.append(
        f"Test (paired over (class, seed), so that each class's difficulty cancels): mean "
        f"difference {points(paired['mean'])} points, SD {100 * paired['sd']:.2f}, standard error "
        f"{100 * paired['se']:.2f}; two-sided one-sample t-test of the differences, "
        f"t = {paired['t']:.2f} with {paired['df']} degrees of freedom, p = {paired['p']:.3f}: "
        f"**{verdict} the seed noise** at the {SIGNIFICANCE:g} level"
        + ("" if paired["n"] == len(rows) // 2 else " (provisional: not every pair measured)")
        + "."
    )
    if "p" in welch:
        lines += [
            "",
            f"For comparison, Welch's t-test of the unpaired gains ({welch['n_pil']} Pillow vs "
            f"{welch['n_device']} device runs; the spread between classes counts as noise): "
            f"t = {welch['t']:.2f}, {welch['df']:.1f} degrees of freedom, p = {welch['p']:.3f}.",
        ]
    return lines


def compactness_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    """Mean cos(phi, c_hat) of the normal training images before and after fine-tuning."""
    if not records:
        return []
    lines = [
        "| run | before | after | after, own center |",
        "|---|---|---|---|",
    ]
    for record in sorted(records, key=lambda r: r["name"]):
        c = record.get("compactness") or {}
        lines.append(
            f"| `{record['name']}` | {c.get('before', float('nan')):.4f} | "
            f"{c.get('after', float('nan')):.4f} | {c.get('after_own_center', float('nan')):.4f} |"
        )
    return lines


def timing_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    """Wall time, load and provenance of every run."""
    if not records:
        return []
    lines = [
        "| run | wall (min) | resumed | 1-min load mean (min-max) | finished | commit |",
        "|---|---|---|---|---|---|",
    ]
    for record in sorted(records, key=lambda r: r["name"]):
        load = record["load_1min"]
        git = record["git"]
        commit = git["commit"][:10] + (" (modified)" if git.get("dirty") else "")
        lines.append(
            f"| `{record['name']}` | {record['timing']['wall_s'] / 60:.1f} | "
            f"{'yes' if record['timing']['resumed'] else 'no'} | {load['mean']:.1f} "
            f"({load['min']:.1f}-{load['max']:.1f}) | {record['finished']} | {commit} |"
        )
    return lines


def settings_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    """Settings shared by the runs (from the first record), and machine and versions."""
    if not records:
        return []
    first = records[0]
    config = first["config"]
    prep = first["preprocessing"]
    keys = ("backbone", "frozen", "batch_size", "epochs", "temperature", "weight_decay", "knn_k")
    versions = ", ".join(f"{k} {v}" for k, v in first["versions"].items())
    return [
        f"- data: {first['data']} (npz sha256 {first['data_sha256'][:12]}...), "
        f"counts of class {first['normal_class']}: {first.get('counts')}",
        "- " + ", ".join(f"{k} = {config[k]!r}" for k in keys),
        f"- evaluation transform: resize {prep['resize']}, crop {prep['crop']}, "
        f"{prep['method']}, mean {prep['mean'][0]:.4f}, std {prep['std'][0]:.4f} (per channel)",
        f"- machine: {first['machine']['cpu']}, {first['machine']['cores']} cores "
        f"(shared with other jobs); versions: {versions}",
    ]


def markdown(
    records: Sequence[dict[str, Any]],
    epoch0: Sequence[dict[str, Any]],
    pilot: Sequence[dict[str, Any]] = (),
    *,
    lr: float,
    published_lr: float,
) -> str:
    """The whole report."""
    jax_runs = [r for r in records if r["implementation"] == "jax"]
    device = [r for r in records if augment_of(r) == "device"]
    rows, means = method_table(device, lr=lr)
    pub_rows, pub_means = method_table(device, lr=published_lr)
    pairs = agreement(device)
    views = pipeline_rows(records, lr=lr)
    lines = [
        "# CIFAR-10 (exact pixels), EfficientNet-Lite0 at 224 px: pretrained kNN vs MSC vs "
        "standard contrastive",
        "",
        "Kind: measured. Generated by `python benchmarks/cifar10_exact_report.py` from the JSON "
        "records in `benchmarks/results/cifar10_exact/records/` (one per run, written by "
        f"`{COMMAND}`) and `benchmarks/results/cifar10_exact/epoch0/` (written by "
        "`python benchmarks/cifar10_exact_epoch0.py`); do not edit by hand. "
        f"{len(records)} runs finished.",
        "",
        "Data: the original CIFAR-10 pixels of `../shared/data/lossless_reference_subsets.npz` "
        "(per normal class its 366-422 training images among the official first 4000, and all "
        "of the first 1000 test images, 86-112 of them normal), read at their native 32 px "
        "through the product's folder loader from a lossless PNG copy. This is a subset of the "
        "protocol of SPEC §8 (5000 training and 10000 test images per class): comparable across "
        "the methods here, not with published numbers. One-class ROC-AUC %, kNN with k = 2 on "
        "phi; nothing is selected on test data (the columns are the last epoch).",
        "",
        "## Epoch 0: the pretrained kNN under each preprocessing",
        "",
        "Features of all 5000 images once per preprocessing (`cifar10_exact_epoch0.py`); every "
        "variant normalises with (x - 127) / 128.",
        "",
        *epoch0_lines(epoch0),
        "",
        "## Pilot: class 0, MSC, seed 0, per learning rate",
        "",
        "Short runs that chose the learning rate and the number of epochs (`--pilot_lrs`); "
        "the grid's runs at a piloted rate continue from them.",
        "",
        *curve_lines(pilot),
        "",
        f"## One-class ROC-AUC %, learning rate {lr:g}, seed 0",
        "",
        *(_table_lines(rows, means) if rows else ["(no run finished yet)"]),
        "",
        f"## The same at the published learning rate {published_lr:g}",
        "",
        *(_table_lines(pub_rows, pub_means) if pub_rows else ["(no run finished yet)"]),
        "",
        "## Seeds (last epoch)",
        "",
        *seed_lines(seed_pairs(device, lr=lr)),
        "",
        f"## Training views on the device vs with Pillow (MSC, learning rate {lr:g})",
        "",
        "MSC's gain (ROC-AUC after the last epoch minus epoch 0, the pretrained kNN) when the "
        "MoCo-v2 views are made on the device (`augment='device'`, float, exact Gaussian blur) "
        "and when they are made with Pillow as torchvision makes them (`augment='pil'`, 8 bits "
        "after every operation, Pillow's blur); the runs `..._pil`. Everything else is the same: "
        "schedule, images and batch order of a seed, evaluation transform. The views of a seed "
        "are not the same in the two pipelines (different random draws).",
        "",
        *pipeline_lines(views, pipeline_summary(views)),
        "",
        "## JAX vs the PyTorch reference on the same views",
        "",
        "The PyTorch reference (`benchmarks/torch_reference.py`: the `efficientnet-lite-pytorch` "
        "model with the same weights and frozen layers, the same loss and SGD) is trained on the "
        "views the JAX run used (same images, batch order, augmentation function and keys, "
        "regenerated on the host) and evaluated on the same evaluation tensors with its own kNN "
        "and scikit-learn's ROC-AUC. Absolute differences of ROC-AUC per epoch:",
        "",
        *agreement_lines(pairs),
        "",
        "## ROC-AUC % after every epoch",
        "",
        *curve_lines(records),
        "",
        "## Mean training loss per epoch",
        "",
        *loss_lines(records),
        "",
        "## Compactness: mean cos(phi, c_hat) of the normal training images",
        "",
        "c_hat: the unit center of the pretrained features; 'after, own center': the norm of "
        "the mean of the final features.",
        "",
        *compactness_lines(jax_runs),
        "",
        "## Settings, machine, time",
        "",
        *settings_lines(records),
        "",
        *timing_lines(records),
        "",
    ]
    return "\n".join(lines)


def _wrap(text: str) -> list[str]:
    """A paragraph wrapped to the README's line length."""
    return textwrap.wrap(text, width=100, break_long_words=False, break_on_hyphens=False)


def readme_section(
    records: Sequence[dict[str, Any]],
    epoch0: Sequence[dict[str, Any]],
    *,
    lr: float,
    published_lr: float,
) -> str:
    """The README's real-data section (between the markers, markers included)."""
    del published_lr  # the README shows the main rate only
    records = [r for r in records if augment_of(r) == "device"]
    rows, means = method_table(records, lr=lr)
    pairs = agreement(records)
    pooled = pooled_agreement(pairs)
    chosen = next((r for r in epoch0 if r["variant"] == CHOSEN_VARIANT), None)
    epochs = sorted({r[k] for r in rows for k in r if k.endswith("_epochs")})
    schedule = f", {'/'.join(str(e) for e in epochs)} epochs of 7 steps" if epochs else ""
    intro = (
        "**CIFAR-10, exact pixels** (a subset: per class ~400 training images among the official "
        "first 4000, and the first 1000 test images), EfficientNet-Lite0 at its native 224 px "
        "(ImageNet weights; stem and blocks 0-10 frozen; batch 64, SGD without momentum, learning "
        f"rate {lr:g}{schedule}), one-class ROC-AUC % after the last epoch (kNN, k = 2):"
    )
    notes = []
    if chosen is not None:
        notes.append(
            "Pretrained kNN of all 10 classes (epoch 0, bicubic resize to 224 without crop): "
            f"{pct(chosen['mean_auroc'])}% mean."
        )
    if pooled is not None:
        notes.append(
            f"JAX vs the PyTorch reference trained on the same views ({len(pairs)} runs, "
            f"{pooled['n']} evaluations): ROC-AUC differs by at most "
            f"{100 * pooled['max_abs']:.2f} points (mean {100 * pooled['mean_abs']:.2f})."
        )
    notes.append(
        "Curves per epoch, the published learning rate, seeds, preprocessing, the PyTorch "
        "comparison: `benchmarks/results/cifar10_exact.md`. A smaller CPU-scale smoke on the lossy "
        "JPEG copy at 64 px: `benchmarks/results/cifar10_jpeg_efficientnet_lite0.md`."
    )
    lines = [
        BEGIN,
        "<!-- generated by benchmarks/cifar10_exact_report.py from the records in "
        "benchmarks/results/cifar10_exact/; do not edit by hand -->",
        "",
        *_wrap(intro),
        "",
        "```",
        f"{COMMAND}     # resumable; then python benchmarks/cifar10_exact_report.py",
        "```",
        "",
        *(_table_lines(rows, means, with_epochs=False) if rows else ["(no run finished yet)"]),
        "",
        *_wrap(" ".join(notes)),
        "",
        END,
    ]
    return "\n".join(lines)


def replace_section(text: str, section: str) -> str:
    """``text`` with the part between the markers (markers included) replaced by ``section``."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README has no {BEGIN} ... {END} markers; add them where the table goes.")
    return text[:start] + section + text[end + len(END) :]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=pathlib.Path, default=DEFAULT_RESULTS)
    parser.add_argument("--readme", type=pathlib.Path, default=README)
    parser.add_argument("--no_readme", action="store_true")
    parser.add_argument("--lr", type=float, default=3e-3, help="the grid's higher rate")
    parser.add_argument("--published_lr", type=float, default=1e-5)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    records = load_records(args.results / "records")
    epoch0 = load_records(args.results / "epoch0")
    pilot = load_records(args.results / "pilot")
    text = markdown(records, epoch0, pilot, lr=args.lr, published_lr=args.published_lr)
    args.results.with_suffix(".md").write_text(text, encoding="utf-8")
    if not args.no_readme:
        section = readme_section(records, epoch0, lr=args.lr, published_lr=args.published_lr)
        readme = args.readme.read_text(encoding="utf-8")
        args.readme.write_text(replace_section(readme, section), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1:])
