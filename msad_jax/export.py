"""Self-contained scorers: a trained detector serialised with ``jax.export`` (StableHLO).

``python -m msad_jax.export --workdir W --format stablehlo OUT`` (or ``Detector.export(OUT)``)
writes the folder ``OUT`` with two files:

- ``scorer.jax_exported``: one function, uint8 images ``[batch, height, width, channels]`` ->
  float32 anomaly scores ``[batch]``, serialised by ``jax.export`` (StableHLO with the model's
  parameters and the kNN gallery as constants). Batch, height, width and channels are symbolic:
  any batch size, any image size (at least 1x1), 1 to 4 channels (grey, grey + alpha, RGB, RGBA;
  alpha is dropped); one call takes images of one size. Inside: the images are fitted to the side
  of the stored training images (shorter side, bilinear, center crop) and given the backbone's
  evaluation transform (:func:`msad_jax.data.transforms.any_size_transform`), the backbone gives
  unit-norm features, and the score is the sum of squared distances to the ``k`` nearest gallery
  rows. That is what :meth:`msad_jax.detector.Detector.score` computes for image arrays, with the
  same functions, so the two agree to float32 rounding (tested: within 1e-5 relative).
- ``scorer.json``: the threshold (``score > threshold`` is an anomaly), its target false-positive
  rate and calibration scores (to pick another rate), the preprocessing, the sha256 of the
  serialised function, and how to call it.

Loading needs jax alone (no msad_jax, Flax or orbax; ``jax.export`` reads the file with the
``flatbuffers`` package, so ``pip install jax flatbuffers``)::

    import json, numpy as np
    from jax import export
    scorer = export.deserialize(bytearray(open("OUT/scorer.jax_exported", "rb").read()))
    threshold = json.load(open("OUT/scorer.json"))["threshold"]
    scores = np.asarray(scorer.call(images))  # uint8 [N, H, W, C]
    is_anomaly = scores > threshold

Image files are the caller's to decode (e.g. ``np.asarray(PIL.Image.open(f))``); the detector's
own file path fits them with Pillow while decoding (see :mod:`msad_jax.detector`), which can
differ by a grey level per pixel. The function is lowered for CPU by default
(``--platforms=cpu,cuda,tpu`` adds others; only CPU execution is tested). A TensorFlow
SavedModel (jax2tf) is not offered: it is untested.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from jax import export as jax_export

from msad_jax import calibration, knn
from msad_jax.data.transforms import make_any_size_preprocess_fn
from msad_jax.errors import InputError
from msad_jax.features import feature_step
from msad_jax.models import cpu_lowering

if TYPE_CHECKING:
    from msad_jax.detector import Detector

SCORER_FILE = "scorer.jax_exported"
METADATA_FILE = "scorer.json"
FORMATS = ("stablehlo",)
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
INPUT_SHAPE = "batch, height, width, channels"
INPUT_CONSTRAINTS = ("channels <= 4",)


class ExportError(InputError):
    """The export cannot be written as asked; the message says why and what to do."""


def scoring_function(detector: Detector) -> Callable[[jax.Array], jax.Array]:
    """uint8 ``[b, H, W, C]`` -> float32 scores ``[b]``, with the detector's arrays as constants.

    The same preprocessing and feature function as :meth:`Detector.features`, then
    :func:`msad_jax.knn.knn_scores_traceable` against the gallery.
    """
    preprocess = make_any_size_preprocess_fn(detector.image_side, detector.preprocessing)
    features = feature_step(detector.model, preprocess, axis_name=None)
    variables = jax.tree.map(np.asarray, detector.variables)
    gallery = np.asarray(detector.gallery, np.float32)
    k = int(detector.config.knn_k)

    def score(images: jax.Array) -> jax.Array:
        mask = jnp.ones(images.shape[:1], bool)
        phi = features(variables, {"image": images, "mask": mask})["phi"]
        return knn.knn_scores_traceable(gallery, phi, k)

    return score


def export_scorer(
    detector: Detector, *, platforms: Sequence[str] = ("cpu",)
) -> jax_export.Exported:
    """The :func:`scoring_function` exported with symbolic batch, height, width and channels.

    Traced with XLA's own lowering (:func:`msad_jax.models.cpu_lowering.xla_lowering`): the
    program is the same whichever machine exports it, for every platform it is lowered for.
    """
    shape = jax_export.symbolic_shape(INPUT_SHAPE, constraints=INPUT_CONSTRAINTS)
    spec = jax.ShapeDtypeStruct(shape, jnp.uint8)
    scorer = jax.jit(scoring_function(detector))
    with cpu_lowering.xla_lowering():
        return jax_export.export(scorer, platforms=tuple(platforms))(spec)


def _metadata(detector: Detector, exported: jax_export.Exported, blob: bytes) -> dict[str, Any]:
    config = detector.config
    scores = detector.calibration_scores
    return {
        "format": "jax.export (StableHLO)",
        "scorer_file": SCORER_FILE,
        "scorer_sha256": hashlib.sha256(blob).hexdigest(),
        "input": "uint8 [batch, height, width, channels]; channels 1-4 (grey, grey+alpha, RGB, "
        "RGBA); any batch and image size, one size per call",
        "output": "float32 [batch] anomaly scores; an image is anomalous where score > threshold",
        "threshold": float(detector.threshold),
        "target_fpr": detector.target_fpr,
        "calibration": detector.calibration,
        "calibration_scores": None if scores is None else [float(s) for s in scores],
        "image_side": int(detector.image_side),
        "preprocessing": dataclasses.asdict(detector.preprocessing),
        "backbone": config.backbone,
        "dtype": config.dtype,
        "knn_k": int(config.knn_k),
        "gallery_size": int(detector.gallery.shape[0]),
        "feature_dim": int(detector.gallery.shape[1]),
        "checkpoint_step": detector.checkpoint_step,
        "platforms": list(exported.platforms),
        "jax_version": jax.__version__,
        "calling_convention_version": exported.calling_convention_version,
    }


def _check_output(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise ExportError(f"{path} is an existing file; give a new folder to export to.")
    if os.path.isdir(path) and os.listdir(path):
        raise ExportError(
            f"{path} exists and is not empty; give a new folder (nothing is overwritten)."
        )


def _write(path: str, data: bytes) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "wb") as handle:
        handle.write(data)
    os.replace(temporary, path)


def export(
    detector: Detector,
    path: str | os.PathLike,
    *,
    fpr: float | None = None,
    platforms: Sequence[str] = ("cpu",),
) -> dict[str, Any]:
    """Writes the scorer of ``detector`` to the new (or empty) folder ``path``.

    Args:
      detector: a loaded detector.
      path: the output folder: ``scorer.jax_exported`` and ``scorer.json`` (module docstring).
      fpr: a target false-positive rate for the threshold instead of the detector's.
      platforms: platforms to lower for (``cpu``, ``cuda``, ``rocm``, ``tpu``).

    Returns:
      The metadata written to ``scorer.json``.

    Raises:
      ExportError: ``path`` is a file or a non-empty folder, or a platform is unknown.
      CalibrationError: ``fpr`` cannot be met with the stored calibration scores.
    """
    path = os.fspath(path)
    unknown = sorted(set(platforms) - set(PLATFORMS))
    if unknown or not platforms:
        raise ExportError(
            f"Unknown platform(s) {', '.join(unknown) or '(none)'}; use some of "
            f"{', '.join(PLATFORMS)}."
        )
    _check_output(path)
    if fpr is not None:
        detector = detector.with_fpr(fpr)
    exported = export_scorer(detector, platforms=platforms)
    blob = bytes(exported.serialize())
    metadata = _metadata(detector, exported, blob)
    os.makedirs(path, exist_ok=True)
    _write(os.path.join(path, SCORER_FILE), blob)
    text = json.dumps(metadata, indent=2)
    _write(os.path.join(path, METADATA_FILE), text.encode())
    return json.loads(text)


# --------------------------------------------------------------------------------------------
# Command line.


def _define_flags() -> None:
    """The command's flags (defined only when run as a command: the library defines none)."""
    flags.DEFINE_string("workdir", None, "Folder of a finished training run.")
    flags.DEFINE_string("format", "stablehlo", "Artifact format: stablehlo (jax.export).")
    flags.DEFINE_float(
        "fpr", None, "Target false-positive rate of the stored threshold (default: the run's)."
    )
    flags.DEFINE_list(
        "platforms", ["cpu"], "Platforms to lower for, comma-separated: cpu, cuda, rocm, tpu."
    )


def _check_format(value: str) -> None:
    if value == "savedmodel":
        raise ExportError(
            "--format=savedmodel (TensorFlow) is not available in this version; use "
            "--format=stablehlo (loadable with jax alone)."
        )
    if value not in FORMATS:
        raise ExportError(f"--format={value} is not a format; use {', '.join(FORMATS)}.")


def main(argv: list[str]) -> None:
    """Exports the detector of ``--workdir`` to the folder named on the command line."""
    from msad_jax.detector import Detector
    from msad_jax.errors import user_errors

    logging.set_verbosity(logging.WARNING)
    with user_errors():
        if len(argv) != 2:
            raise ExportError(
                "Give exactly one output folder: python -m msad_jax.export --workdir W "
                "--format stablehlo OUT."
            )
        options = flags.FLAGS
        if not options.workdir:
            raise ExportError("Give the run to export with --workdir.")
        _check_format(options.format)
        _check_output(argv[1])
        if options.fpr is not None:
            calibration.check_fpr(options.fpr, "--fpr")
        detector = Detector.load(options.workdir, fpr=options.fpr)
        metadata = export(detector, argv[1], platforms=options.platforms)
    print(
        f"{os.path.join(argv[1], SCORER_FILE)}: threshold {metadata['threshold']:.6g} "
        f"(target false-positive rate {metadata['target_fpr']}), platforms "
        f"{','.join(metadata['platforms'])}"
    )


if __name__ == "__main__":
    from msad_jax.console import parse_absl_flags, wants_help

    _define_flags()
    if wants_help(sys.argv):  # the module's summary and usage, then its flags; exit status 0
        print(__doc__.split("\n\n")[0])
        print("\nUsage: python -m msad_jax.export --workdir W [--format stablehlo] OUT\n")
        print(flags.FLAGS.module_help(sys.modules[__name__]))
        sys.exit(0)
    app.run(main, flags_parser=parse_absl_flags)
