"""Pretrained kNN ROC-AUC on the digits demo data, by input size and polarity.

Measures what ``configs/demo.py`` chose: for each input size and for bright-on-black (as
scikit-learn ships the digits) or inverted images, the features of all digits once with the
pretrained EfficientNet-Lite0, then the one-class kNN ROC-AUC of every digit (gallery = the
training images of that digit, test = all test digits). Prints a Markdown table; ``--out`` appends
it to a file.

Usage (from the repository root, with the ``efficientnet`` extra installed)::

    python benchmarks/demo_choices.py --sizes 32,64,96,128 --out benchmarks/results/demo.md
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from msad_jax import evaluation, knn, train
from msad_jax.config import default_config
from msad_jax.data import digits, transforms
from msad_jax.features import make_feature_extractor
from msad_jax.metrics import roc_auc
from msad_jax.train_step import replicate_state


def digit_aurocs(
    size: int, invert: bool, *, k: int = 2, batch_size: int = 128
) -> tuple[list[float], float]:
    """Per-digit pretrained kNN ROC-AUC at one input size and polarity.

    Args:
      size: side of the (uncropped) network input.
      invert: dark digits on a light background.
      k: kNN neighbours.
      batch_size: feature-extraction batch.

    Returns:
      ``(aurocs of digits 0..9, seconds for the features)``.
    """
    config = default_config()
    config.backbone, config.pretrained, config.offline = "efficientnet_lite0", True, True
    config.resize, config.crop = size, 0
    model, variables, spec = train.model_and_variables(config)
    prep = train.preprocessing_for(config, spec)
    extractor = make_feature_extractor(model, transforms.make_preprocess_fn(prep))
    replicated = replicate_state(dict(variables))
    train_x, train_y, test_x, test_y = digits.load_digits_arrays(invert=invert)
    start = time.perf_counter()
    phi_train = evaluation.features_of(extractor, replicated, train_x, batch_size=batch_size)
    phi_test = evaluation.features_of(extractor, replicated, test_x, batch_size=batch_size)
    seconds = time.perf_counter() - start
    aurocs = []
    for digit in range(10):
        scores = np.asarray(knn.knn_scores(phi_train[train_y == digit], phi_test, k=k))
        aurocs.append(roc_auc((test_y != digit).astype(np.int32), scores))
    return aurocs, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="32,64,96,128", help="comma-separated input sides")
    parser.add_argument("--out", default="", help="append the Markdown table to this file")
    args = parser.parse_args()
    lines = [
        "## Pretrained kNN ROC-AUC % by input size and polarity (`benchmarks/demo_choices.py`)",
        "",
        "| size | polarity | " + " | ".join(str(d) for d in range(10)) + " | mean | features s |",
        "|---|---|" + "---|" * 10 + "---|---|",
    ]
    for size in (int(s) for s in args.sizes.split(",")):
        for invert in (False, True):
            aurocs, seconds = digit_aurocs(size, invert)
            cells = " | ".join(f"{100 * a:.2f}" for a in aurocs)
            polarity = "inverted" if invert else "bright on black"
            lines.append(
                f"| {size} | {polarity} | {cells} | {100 * np.mean(aurocs):.2f} | {seconds:.1f} |"
            )
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as handle:
            handle.write("\n" + text)


if __name__ == "__main__":
    main()
