"""Who moves towards the center: normal vs anomalous test features, before and after fine-tuning.

For finished runs of the main job (workdirs with ``run.json`` and ``checkpoints/``) this extracts
the features of the run's training and test images with the pretrained weights and with the last
checkpoint, and prints, per run, the mean cosine to the unit center ``c_hat`` of the pretrained
training features for training, normal test and anomalous test images, and the kNN ROC-AUC. If
fine-tuning pulls anomalous test images towards ``c_hat`` as much as normal ones, the kNN ranking,
hence the ROC-AUC, barely changes, however much the training features gain in compactness.

Usage (from the repository root)::

    python benchmarks/compactness_diagnostic.py runs/bench/msc/class_0* --out results.md
"""

from __future__ import annotations

import argparse
import json
import pathlib

import ml_collections
import numpy as np

from msad_jax import evaluation, knn, train
from msad_jax.checkpointing import RunCheckpoints
from msad_jax.data import transforms
from msad_jax.features import make_feature_extractor
from msad_jax.metrics import roc_auc
from msad_jax.train_step import replicate_state


def _mean_cosines(
    train_phi: np.ndarray, test_phi: np.ndarray, anomalous: np.ndarray, c_hat: np.ndarray
) -> dict[str, float]:
    return {
        "train": float((train_phi @ c_hat).mean()),
        "normal": float((test_phi[~anomalous] @ c_hat).mean()),
        "anomalous": float((test_phi[anomalous] @ c_hat).mean()),
    }


def diagnose(run: pathlib.Path, *, batch_size: int = 128) -> dict[str, dict[str, float]]:
    """Mean cosines to the pretrained center and ROC-AUC, before and after fine-tuning.

    Args:
      run: workdir of one finished class (``run.json`` and ``checkpoints/``).
      batch_size: feature-extraction batch.

    Returns:
      ``{'before': {...}, 'after': {...}}``, each with the mean cosines of ``train``, ``normal``
      and ``anomalous`` images to the pretrained unit center and the ``auroc``.
    """
    config = ml_collections.ConfigDict(json.loads((run / "run.json").read_text())["config"])
    data = train.load_data(config, int(config.normal_class))
    model, variables, spec = train.model_and_variables(config)
    prep = train.preprocessing_for(config, spec)
    extractor = make_feature_extractor(model, transforms.make_preprocess_fn(prep))
    saved = RunCheckpoints(run / "checkpoints").restore_arrays()
    anomalous = data.test_labels == 1
    result, c_hat = {}, None
    for name, params in (("before", variables["params"]), ("after", saved["params"])):
        replicated = replicate_state({**variables, "params": params})
        gallery = evaluation.features_of(
            extractor, replicated, data.train_images, batch_size=batch_size
        )
        test = evaluation.features_of(
            extractor, replicated, data.test_images, batch_size=batch_size
        )
        if c_hat is None:
            center = gallery.mean(axis=0)
            c_hat = center / np.linalg.norm(center)
        scores = np.asarray(knn.knn_scores(gallery, test, k=config.knn_k))
        result[name] = _mean_cosines(gallery, test, anomalous, c_hat)
        result[name]["auroc"] = roc_auc(data.test_labels, scores)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=pathlib.Path, help="workdirs of finished classes")
    parser.add_argument("--out", default="", help="append the Markdown table to this file")
    args = parser.parse_args()
    lines = [
        "| run | ROC-AUC before -> after | cos train | cos normal test | cos anomalous test "
        "| normal gain - anomalous gain |",
        "|---|---|---|---|---|---|",
    ]
    print(lines[0], lines[1], sep="\n", flush=True)
    for run in args.runs:
        r = diagnose(run)
        b, a = r["before"], r["after"]
        gap = (a["normal"] - b["normal"]) - (a["anomalous"] - b["anomalous"])
        lines.append(
            f"| {run.parent.name}/{run.name} | {100 * b['auroc']:.2f} -> {100 * a['auroc']:.2f} "
            f"| {b['train']:.3f} -> {a['train']:.3f} | {b['normal']:.3f} -> {a['normal']:.3f} "
            f"| {b['anomalous']:.3f} -> {a['anomalous']:.3f} | {gap:+.4f} |"
        )
        print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as handle:
            handle.write("\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
