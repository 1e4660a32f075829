"""Using a trained model: score new images and flag anomalies.

``Detector.load(workdir)`` reads what a finished run left in its workdir (the kNN gallery of the
normal training images and the decision threshold from ``detector.npz``, and the parameters of the
checkpoint that file was built from) and rebuilds the backbone and its evaluation transform::

    detector = Detector.load("runs/cifar10_c0")
    scores = detector.score(images)        # uint8 [N, H, W, 3], or a list of image files
    is_anomaly = detector.predict(images)  # score > threshold

The threshold is the ``config.threshold_quantile`` quantile (default 0.95) of the leave-one-out
scores of the normal training images, so about 5% of normal images are flagged.

Both files are verified: ``detector.npz`` against the sha256 digest it carries (and its gallery
must be finite), the checkpoint as :mod:`msad_jax.checkpointing` does. A damaged one raises
:class:`msad_jax.checkpointing.CheckpointError` naming it. A score that is NaN or infinite is never
called normal: :meth:`Detector.score` raises :class:`NonFiniteScoresError`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
import zlib
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from msad_jax import knn
from msad_jax.checkpointing import CheckpointError, DamagedCheckpointError, RunCheckpoints
from msad_jax.data.images import decode_image, fit_square
from msad_jax.data.transforms import Preprocessing, make_preprocess_fn
from msad_jax.errors import InputError, MissingInputError, UserError
from msad_jax.evaluation import features_of
from msad_jax.features import make_feature_extractor
from msad_jax.models import build_backbone
from msad_jax.train import DETECTOR_FILE, RUN_INFO_FILE, compute_dtype, detector_arrays_digest
from msad_jax.train_step import replicate_state

ImagesLike = np.ndarray | Sequence[str | os.PathLike]


class NonFiniteScoresError(UserError, RuntimeError):
    """The model gave NaN or infinite scores; no image is labelled."""


def read_detector_file(path: str) -> dict[str, np.ndarray]:
    """The arrays of a ``detector.npz``, verified against the digest stored in it.

    Raises:
      CheckpointError: the file cannot be read, does not match its digest, or its gallery or
        threshold is not finite.
    """
    remedy = "run the training again in the same workdir to rewrite it"
    try:
        with np.load(path, allow_pickle=False) as saved:
            arrays = {name: saved[name] for name in saved.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise CheckpointError(
            f"Detector file {path} cannot be read ({type(err).__name__}: {err}); {remedy}."
        ) from err
    stored = arrays.get("sha256")
    if stored is not None and str(stored) != detector_arrays_digest(arrays):
        raise CheckpointError(
            f"Detector file {path} is damaged: its arrays differ from the sha256 digest stored "
            f"when it was written; {remedy}."
        )
    missing = [k for k in ("gallery", "threshold", "image_side") if k not in arrays]
    if missing:
        raise CheckpointError(f"Detector file {path} lacks {', '.join(missing)}; {remedy}.")
    if not (np.isfinite(arrays["gallery"]).all() and np.isfinite(arrays["threshold"])):
        raise CheckpointError(
            f"Detector file {path} is damaged: its gallery or threshold holds NaN or infinite "
            f"values; {remedy}."
        )
    return arrays


def _read_images(images: ImagesLike, side: int) -> np.ndarray:
    """uint8 ``[N, side, side, 3]`` from an array or a list of image files."""
    if isinstance(images, np.ndarray):
        array = images
        if array.ndim == 3:
            array = np.repeat(array[..., None], 3, axis=-1)
        if array.ndim != 4 or array.shape[-1] not in (1, 3, 4) or array.dtype != np.uint8:
            raise InputError(
                f"Images must be uint8 [N, H, W, 3] (or [N, H, W] grayscale), got {array.dtype} "
                f"{array.shape}; or pass a list of image file paths."
            )
        if array.shape[-1] == 1:
            array = np.repeat(array, 3, axis=-1)
        array = array[..., :3]
        if array.shape[1:3] == (side, side):
            return array
        return np.stack([fit_square(a, side) for a in array])
    decoded = []
    for path in images:
        with open(path, "rb") as handle:
            decoded.append(decode_image(handle.read(), os.fspath(path), size=side))
    if not decoded:
        raise InputError("No images given.")
    return np.stack(decoded)


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
    """

    config: ml_collections.ConfigDict
    model: Any
    variables: dict[str, Any]
    preprocessing: Preprocessing
    gallery: np.ndarray
    threshold: float
    image_side: int

    def __post_init__(self) -> None:
        self._extractor = make_feature_extractor(self.model, make_preprocess_fn(self.preprocessing))
        self._replicated = replicate_state(self.variables)

    @classmethod
    def load(cls, workdir: str | os.PathLike) -> Detector:
        """Loads the detector of a finished run in ``workdir``.

        The parameters are those of the checkpoint ``detector.npz`` was built from (recorded in
        it; files of older versions: the newest checkpoint).

        Raises:
          MissingInputError: ``workdir`` holds no finished run (or holds per-class subfolders).
          CheckpointError: ``detector.npz`` or the checkpoint is damaged or missing.
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
        with open(info_path, encoding="utf-8") as handle:
            info = json.load(handle)
        config = ml_collections.ConfigDict(info["config"])
        prep = Preprocessing(
            **{
                **info["preprocessing"],
                "mean": tuple(info["preprocessing"]["mean"]),
                "std": tuple(info["preprocessing"]["std"]),
            }
        )
        saved = read_detector_file(detector_path)
        if "knn_k" in saved:
            config.knn_k = int(saved["knn_k"])  # a re-run may have changed run.json meanwhile
        checkpoints = RunCheckpoints(
            os.path.join(workdir, "checkpoints"), asynchronous=False, create=False
        )
        step = int(saved["checkpoint_step"]) if "checkpoint_step" in saved else None
        if step is not None and step not in checkpoints.all_steps():
            raise CheckpointError(
                f"{detector_path} was built from checkpoint {checkpoints.folder(step)}, which is "
                "gone; run the training again in the same workdir to rewrite it."
            )
        try:
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
        return cls(
            config=config,
            model=build_backbone(config.backbone, dtype=compute_dtype(config)),
            variables={"params": state["params"], "batch_stats": state.get("batch_stats", {})},
            preprocessing=prep,
            gallery=saved["gallery"],
            threshold=float(saved["threshold"]),
            image_side=int(saved["image_side"]),
        )

    def features(self, images: ImagesLike) -> np.ndarray:
        """Unit-norm features phi ``[N, D]`` of images (array or file paths)."""
        array = _read_images(images, self.image_side)
        return features_of(
            self._extractor, self._replicated, array, batch_size=self.config.eval_batch_size
        )

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
