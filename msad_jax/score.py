"""Command line: score images with a trained run.

``python -m msad_jax.score --workdir DIR PATH [PATH ...]`` prints, per image, its anomaly score and
its label (``anomalous`` when the score exceeds the run's threshold, else ``normal``), tab
separated. A PATH that is a folder stands for the image files inside it (recursively).

The threshold is the run's, set for its target false-positive rate on normal images
(``config.threshold_fpr``, default 5%); ``--fpr 0.01`` sets it for another rate from the
calibration scores stored with the run (no retraining). See :mod:`msad_jax.detector`.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from msad_jax.data.folders import IMAGE_EXTENSIONS, natural_key
from msad_jax.errors import MissingInputError

_WORKDIR = flags.DEFINE_string("workdir", None, "Folder of a finished training run.")
_FPR = flags.DEFINE_float(
    "fpr",
    None,
    "Target false-positive rate on normal images, e.g. 0.01 (default: the run's threshold).",
)
flags.mark_flag_as_required("workdir")


def expand_paths(paths: list[str]) -> list[str]:
    """Image files named by ``paths`` (folders are searched recursively, in natural order)."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = [
                os.path.join(root, name)
                for root, _, names in os.walk(path)
                for name in names
                if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
            ]
            files.extend(sorted(found, key=natural_key))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise MissingInputError(f"No such image file or folder: {path}.")
    if not files:
        raise MissingInputError(f"No image files found in {' '.join(paths)}.")
    return files


def main(argv: list[str]) -> None:
    """Scores the images named on the command line."""
    from msad_jax.calibration import check_fpr
    from msad_jax.detector import Detector
    from msad_jax.errors import user_errors

    logging.set_verbosity(logging.WARNING)
    if len(argv) < 2:
        raise app.UsageError("Give at least one image file or folder to score.")
    with user_errors():
        if _FPR.value is not None:
            check_fpr(_FPR.value, "--fpr")
        files = expand_paths(argv[1:])
        detector = Detector.load(_WORKDIR.value, fpr=_FPR.value)
        scores = detector.score(files)
    for path, score in zip(files, scores, strict=True):
        label = "anomalous" if score > detector.threshold else "normal"
        print(f"{path}\t{score:.6f}\t{label}")
    fpr = detector.target_fpr
    target = "" if fpr is None else f" (target false-positive rate {fpr:g})"
    print(f"threshold {detector.threshold:.6f}{target}", file=sys.stderr)


if __name__ == "__main__":
    from msad_jax.console import parse_absl_flags

    app.run(main, flags_parser=parse_absl_flags)
