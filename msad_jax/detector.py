"""Using a trained model: score new images and flag anomalies.

``Detector.load(workdir)`` reads ``run.json`` and ``detector.npz`` (verified by its sha256 digest);
``score``/``predict`` take uint8 images of any size or image files, fitted and transformed as in
training. The threshold is set from normal images only for a target false-positive rate
(:mod:`msad_jax.calibration`); ``with_fpr`` recomputes it without retraining. A non-finite score is
never called normal. No training code is imported (neither orbax nor matplotlib)::

    detector = Detector.load("runs/cifar10_c0")
    scores = detector.score(images)        # uint8 [N, H, W, C] of any size, or image files
    is_anomaly = detector.predict(images)  # score > threshold
    strict = detector.with_fpr(0.01)       # another target false-positive rate
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import jax_utils

from msad_jax import calibration, knn
from msad_jax.config import compute_dtype
from msad_jax.data.images import decode_image
from msad_jax.data.transforms import Preprocessing, make_any_size_preprocess_fn
from msad_jax.errors import CheckpointError, InputError, MissingInputError, UserError
from msad_jax.evaluation import features_of
from msad_jax.features import make_feature_extractor
from msad_jax.models import build_backbone
from msad_jax.run_files import (
    DETECTOR_FILE,
    RUN_INFO_FILE,
    read_detector_file,
    unflatten_variables,
)

ImagesLike = np.ndarray | Sequence[str | os.PathLike]
# Bound on one feature-extraction batch of large images, in input values (float32: 256 MiB).
_BATCH_VALUES = 2**26


class NonFiniteScoresError(UserError, RuntimeError):
    """The model gave NaN or infinite scores; no image is labelled."""


def check_image_array(images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, H, W, C]`` (C in 1..4) from an array of images; grey ``[N, H, W]`` gains C = 1.

    Raises:
      InputError: another dtype or layout.
    """
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or not 1 <= array.shape[-1] <= 4 or array.dtype != np.uint8:
        raise InputError(
            f"Images must be uint8 [N, H, W, C] with C = 1, 2, 3 or 4 (or [N, H, W] grey), got "
            f"{array.dtype} {array.shape}; or pass a list of image file paths."
        )
    if not array.shape[1] or not array.shape[2]:
        raise InputError(f"Images must be at least 1x1 pixels, got shape {array.shape}.")
    return array


def read_images(images: ImagesLike, side: int) -> np.ndarray:
    """uint8 ``[N, H, W, C]``: an array checked, or files decoded and fitted to ``side``."""
    if isinstance(images, np.ndarray):
        return check_image_array(images)
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    decoded = []
    for path in images:
        if not isinstance(path, (str, os.PathLike)):
            raise InputError(
                f"Give images as one uint8 array [N, H, W, C] or a list of file paths, not a "
                f"list of {type(path).__name__}."
            )
        with open(path, "rb") as handle:
            decoded.append(decode_image(handle.read(), os.fspath(path), size=side))
    if not decoded:
        raise InputError("No images given.")
    return np.stack(decoded)


def _read_run_info(path: str) -> tuple[ml_collections.ConfigDict, Preprocessing]:
    try:
        with open(path, encoding="utf-8") as handle:
            info = json.load(handle)
        prep = info["preprocessing"]
        return ml_collections.ConfigDict(info["config"]), Preprocessing(
            **{**prep, "mean": tuple(prep["mean"]), "std": tuple(prep["std"])}
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{path} cannot be read ({type(err).__name__}: {err}); run the training again in "
            "the same workdir to rewrite it."
        ) from err


def _checkpoint_variables(workdir: str, detector_path: str, step: int | None) -> dict[str, Any]:
    """Inference variables of checkpoint ``step`` (detector files of earlier versions)."""
    from msad_jax.checkpointing import DamagedCheckpointError, RunCheckpoints

    checkpoints = RunCheckpoints(
        os.path.join(workdir, "checkpoints"), asynchronous=False, create=False
    )
    try:
        if step is not None and step not in checkpoints.all_steps():
            raise CheckpointError(
                f"{detector_path} was built from checkpoint {checkpoints.folder(step)}, which "
                "is gone; run the training again in the same workdir to rewrite it."
            )
        state = checkpoints.restore_arrays(step)
    except DamagedCheckpointError as err:
        raise DamagedCheckpointError(
            f"{err}; run the training again in {workdir}: it moves the damaged checkpoint "
            "aside and resumes from the newest intact one.",
            step=err.step,
            folder=err.folder,
        ) from err
    finally:
        checkpoints.close()
    if "params" not in state:
        raise CheckpointError(f"The checkpoint in {workdir} holds no parameters.")
    return {"params": state["params"], "batch_stats": state.get("batch_stats", {})}


@dataclasses.dataclass
class Detector:
    """A trained anomaly detector (see the module docstring).

    Attributes:
      config: the training run's configuration.
      model: the backbone (Flax module).
      variables: ``{'params', 'batch_stats'}`` of the trained model.
      preprocessing: evaluation transform.
      gallery: phi of the normal training images ``[N, D]``.
      threshold: scores above it are anomalies.
      image_side: side of the stored training images (new images are fitted to it first).
      calibration_scores: scores of normal images the threshold is set from (``[n]``).
      calibration: where they come from: ``'leave_one_out'`` or ``'holdout'``.
      target_fpr: the false-positive rate the threshold was set for (None: unknown).
      checkpoint_step: the training step of the variables (None: unknown).
    """

    config: ml_collections.ConfigDict
    model: Any
    variables: dict[str, Any]
    preprocessing: Preprocessing
    gallery: np.ndarray
    threshold: float
    image_side: int
    calibration_scores: np.ndarray | None = None
    calibration: str = calibration.LEAVE_ONE_OUT
    target_fpr: float | None = None
    checkpoint_step: int | None = None

    def __post_init__(self) -> None:
        preprocess = make_any_size_preprocess_fn(self.image_side, self.preprocessing)
        self._extractor = make_feature_extractor(self.model, preprocess)
        self._replicated = jax_utils.replicate(self.variables, axis_name="batch")

    @classmethod
    def load(cls, workdir: str | os.PathLike, *, fpr: float | None = None) -> Detector:
        """Loads the detector of a finished run in ``workdir``.

        Args:
          workdir: the run's folder (one class: ``<workdir>/class_<i>_<name>`` of an ``'all'`` run).
          fpr: a target false-positive rate for the threshold instead of the run's
            (:meth:`with_fpr`).

        Raises:
          MissingInputError: ``workdir`` holds no finished run (or holds per-class subfolders).
          CheckpointError: ``detector.npz`` (or for files of earlier versions, the checkpoint it was
            built from) is damaged or missing.
          CalibrationError: ``fpr`` is outside (0, 1) or needs more calibration scores.
        """
        workdir = os.fspath(workdir)
        info_path = os.path.join(workdir, RUN_INFO_FILE)
        detector_path = os.path.join(workdir, DETECTOR_FILE)
        if not (os.path.isfile(info_path) and os.path.isfile(detector_path)):
            listing = os.listdir(workdir) if os.path.isdir(workdir) else []
            classes = sorted(d for d in listing if d.startswith("class_"))
            hint = f" (per-class runs: pass one of {workdir}/{classes[0]} ...)" if classes else ""
            raise MissingInputError(
                f"{workdir} holds no finished run ({RUN_INFO_FILE} and {DETECTOR_FILE} are "
                f"written at the end of training){hint}."
            )
        config, prep = _read_run_info(info_path)
        saved = read_detector_file(detector_path)
        if "knn_k" in saved:
            config.knn_k = int(saved["knn_k"])  # a re-run may have changed run.json meanwhile
        step = int(saved["checkpoint_step"]) if "checkpoint_step" in saved else None
        variables = unflatten_variables(saved)
        if not variables:  # a file of an earlier version
            variables = _checkpoint_variables(workdir, detector_path, step)
        variables.setdefault("batch_stats", {})
        detector = cls(
            config=config,
            model=build_backbone(config.backbone, dtype=compute_dtype(config)),
            variables=variables,
            preprocessing=prep,
            gallery=saved["gallery"],
            threshold=float(saved["threshold"]),
            image_side=int(saved["image_side"]),
            calibration_scores=saved.get("calibration_scores", saved.get("train_scores")),
            calibration=str(saved.get("calibration", calibration.LEAVE_ONE_OUT)),
            target_fpr=_stored_fpr(saved, config),
            checkpoint_step=step,
        )
        return detector if fpr is None else detector.with_fpr(fpr)

    def with_fpr(self, fpr: float) -> Detector:
        """This detector with its threshold set for the false-positive rate ``fpr``.

        Raises:
          CalibrationError: ``fpr`` is outside (0, 1), or there are too few calibration scores for
            it, or none are stored.
        """
        if self.calibration_scores is None:
            raise calibration.CalibrationError(
                "This detector stores no calibration scores; run the training again to set "
                "another false-positive rate."
            )
        other = copy.copy(self)  # shares the compiled feature extractor
        other.threshold = calibration.threshold_at_fpr(self.calibration_scores, fpr)
        other.target_fpr = float(fpr)
        return other

    def features(self, images: ImagesLike) -> np.ndarray:
        """Unit-norm features phi ``[N, D]`` of images (array or file paths)."""
        array = read_images(images, self.image_side)
        devices = jax.local_device_count()
        per_image = int(np.prod(array.shape[1:]))
        batch = min(self.config.eval_batch_size, len(array), max(1, _BATCH_VALUES // per_image))
        batch = -(-batch // devices) * devices
        return features_of(self._extractor, self._replicated, array, batch_size=batch)

    def score(self, images: ImagesLike) -> np.ndarray:
        """Anomaly scores ``[N]``: summed squared distances to the k nearest normal images.

        Raises:
          NonFiniteScoresError: a score is NaN or infinite (never reported as normal).
        """
        phi = self.features(images)
        scores = np.asarray(
            knn.knn_scores(
                self.gallery,
                phi,
                self.config.knn_k,
                memory_budget_bytes=self.config.knn_memory_budget_mb * 2**20,
            ),
            np.float64,
        )
        bad = int(np.sum(~np.isfinite(scores)))
        if bad:
            raise NonFiniteScoresError(
                f"{bad} of {len(scores)} scores are NaN or infinite: the model's features are "
                "not finite (damaged parameters?); no image was labelled."
            )
        return scores

    def predict(self, images: ImagesLike) -> np.ndarray:
        """bool ``[N]``: True where the score exceeds the threshold (an anomaly).

        Raises:
          NonFiniteScoresError: a score is NaN or infinite.
        """
        return self.score(images) > self.threshold

    def export(self, path: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
        """Writes a self-contained scorer to the folder ``path`` (:func:`msad_jax.export.export`).

        Returns:
          The scorer's metadata (also written beside it).
        """
        from msad_jax.export import export

        return export(self, path, **kwargs)


def _stored_fpr(saved: dict[str, np.ndarray], config: ml_collections.ConfigDict) -> float | None:
    """The target FPR of a detector file (earlier versions: ``1 - config.threshold_quantile``)."""
    if "target_fpr" in saved:
        return float(saved["target_fpr"])
    if "threshold_quantile" in config:
        return round(1.0 - float(config.threshold_quantile), 12)
    return None
