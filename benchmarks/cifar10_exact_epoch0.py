"""Epoch 0 on the exact CIFAR-10 pixels: pretrained kNN ROC-AUC under several preprocessings.

Before any training the one-class ROC-AUC is kNN (k = 2) on the pretrained features, so it depends
only on the backbone and on how the 32 px images are brought to its input size. This script
computes the pretrained features of all images of ``lossless_reference_subsets.npz`` (the 4000
training images hold every class's normal set; the 1000 test images are every class's test set)
once per preprocessing variant, with the product's feature extractor
(``msad_jax.features.make_feature_extractor``), and scores every class with the product's kNN
(``msad_jax.knn.knn_scores``) and metrics. One JSON record per (backbone, variant) goes to
``<records>/<backbone>_<variant>.json``; a finished record is skipped. The features are kept in
``<workdir>`` so a rerun only rescores.

Variants (all normalise with the backbone's ``(x - 127) / 128``):

* ``crop``: the registry's evaluation transform, the TF reference's: bicubic resize of the shorter
  side to resolution + 32, centre crop to the resolution (Lite0: 256 -> 224);
* ``resize_bicubic``: bicubic resize straight to the resolution, no crop (float, never rounded);
* ``resize_bilinear``: the same with bilinear interpolation;
* ``resize_bicubic_uint8``: Pillow's bicubic resize to the resolution, rounded to uint8 on the host
  (what torchvision's ``Resize`` does on PIL images), then no further resizing.

Usage (repository root)::

    python benchmarks/cifar10_exact_epoch0.py --data ../shared/data/lossless_reference_subsets.npz
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import time
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import exact_cifar  # noqa: E402
import run_records  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
VARIANTS = ("resize_bicubic", "crop", "resize_bicubic_uint8", "resize_bilinear")
DEFAULT_RECORDS = REPO / "benchmarks" / "results" / "cifar10_exact" / "epoch0"


def variant_preprocessing(backbone: str, variant: str):
    """``(Preprocessing, host_side)``: the device transform and the host uint8 resize (or None)."""
    from msad_jax.models import backbone_spec

    prep = backbone_spec(backbone).preprocessing
    side = prep.size
    if variant == "crop":
        return prep, None
    if variant == "resize_bicubic":
        return dataclasses.replace(prep, resize=side, crop=None, method="bicubic"), None
    if variant == "resize_bilinear":
        return dataclasses.replace(prep, resize=side, crop=None, method="bilinear"), None
    if variant == "resize_bicubic_uint8":
        return dataclasses.replace(prep, resize=side, crop=None, method="bicubic"), side
    raise ValueError(f"Unknown variant {variant!r}; choose from {', '.join(VARIANTS)}.")


def pil_resize(images: np.ndarray, side: int) -> np.ndarray:
    """Pillow bicubic resize of uint8 images to ``side x side`` (rounded to uint8)."""
    return np.stack(
        [
            np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BICUBIC))
            for image in images
        ]
    )


def features(
    backbone: str, variant: str, images: np.ndarray, *, batch_size: int, chunk: int = 512
) -> np.ndarray:
    """Pretrained phi of ``images`` under ``variant`` (product extractor)."""
    from msad_jax import evaluation
    from msad_jax.data import transforms
    from msad_jax.features import make_feature_extractor
    from msad_jax.models import build_backbone, load_pretrained
    from msad_jax.train_step import replicate_state

    prep, host_side = variant_preprocessing(backbone, variant)
    model = build_backbone(backbone)
    variables = replicate_state(load_pretrained(backbone, offline=True))
    extractor = make_feature_extractor(model, transforms.make_preprocess_fn(prep))
    out = []
    for start in range(0, len(images), chunk):
        part = images[start : start + chunk]
        if host_side is not None:
            part = pil_resize(part, host_side)
        out.append(evaluation.features_of(extractor, variables, part, batch_size=batch_size))
        print(f"  {variant}: {start + len(part)}/{len(images)} images", flush=True)
    return np.concatenate(out)


def class_metrics(
    train_phi: np.ndarray,
    train_labels: np.ndarray,
    test_phi: np.ndarray,
    test_labels: np.ndarray,
    k: int,
) -> list[dict[str, Any]]:
    """One-class kNN metrics of every class from the features of all images."""
    from msad_jax import evaluation, knn

    rows = []
    for c in range(len(exact_cifar.CLASS_NAMES)):
        gallery = train_phi[train_labels == c]
        scores = np.asarray(knn.knn_scores(gallery, test_phi, k), np.float64)
        labels = (test_labels != c).astype(np.int32)
        rows.append(
            {
                "normal_class": c,
                "class_name": exact_cifar.CLASS_NAMES[c],
                "train": int(len(gallery)),
                "test_normal": int(np.sum(labels == 0)),
                **evaluation.score_metrics(labels, scores),
            }
        )
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=pathlib.Path, default=run_records.DEFAULT_DATA)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--workdir", type=pathlib.Path, default=REPO / "runs" / "cifar10_exact")
    parser.add_argument("--records", type=pathlib.Path, default=DEFAULT_RECORDS)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--k", type=int, default=2)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    subsets = exact_cifar.load_subsets(args.data)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = sorted(set(variants) - set(VARIANTS))
    if bad:
        raise SystemExit(f"error: --variants {bad}: choose from {', '.join(VARIANTS)}.")
    import jax

    cache = args.workdir / "jax_cache"
    cache.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(cache))
    sampler = run_records.LoadSampler().start()
    for variant in variants:
        record_path = args.records / f"{args.backbone}_{variant}.json"
        spec = {
            "backbone": args.backbone,
            "variant": variant,
            "knn_k": args.k,
            "data_sha256": subsets.sha256,
        }
        if run_records.existing_record(record_path, spec) is not None:
            print(f"{variant}: done ({record_path.name})", flush=True)
            continue
        store = args.workdir / "epoch0" / f"{args.backbone}_{variant}.npz"
        start = time.time()
        if store.is_file():
            with np.load(store, allow_pickle=False) as saved:
                train_phi, test_phi = saved["train"], saved["test"]
        else:
            train_phi = features(
                args.backbone, variant, subsets.train_images, batch_size=args.batch_size
            )
            test_phi = features(
                args.backbone, variant, subsets.test_images, batch_size=args.batch_size
            )
            store.parent.mkdir(parents=True, exist_ok=True)
            partial = store.with_name(store.stem + ".partial.npz")
            np.savez(partial, train=train_phi, test=test_phi)
            os.replace(partial, store)
        rows = class_metrics(train_phi, subsets.train_labels, test_phi, subsets.test_labels, args.k)
        end = time.time()
        prep, host_side = variant_preprocessing(args.backbone, variant)
        record = {
            "spec": spec,
            "kind": "epoch0",
            "backbone": args.backbone,
            "variant": variant,
            "preprocessing": dataclasses.asdict(prep),
            "host_uint8_resize": host_side,
            "knn_k": args.k,
            "data": exact_cifar.DATA_LABEL,
            "data_sha256": subsets.sha256,
            "classes": rows,
            "mean_auroc": float(np.mean([r["auroc"] for r in rows])),
            "wall_s": end - start,
            "load_1min": sampler.between(start, end),
            **run_records.provenance(),
        }
        run_records.write_record(record_path, record)
        print(
            f"{variant}: mean ROC-AUC {100 * record['mean_auroc']:.2f}% "
            + " ".join(f"{100 * r['auroc']:.2f}" for r in rows),
            flush=True,
        )
    sampler.stop()


if __name__ == "__main__":
    main()
