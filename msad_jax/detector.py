"""Using a trained model: score new images and flag anomalies.

``Detector.load(workdir)`` reads what a finished run left in its workdir (the newest checkpoint's
parameters, the kNN gallery of the normal training images and the decision threshold) and
rebuilds the backbone and its evaluation transform::

    detector = Detector.load("runs/cifar10_c0")
    scores = detector.score(images)        # uint8 [N, H, W, 3], or a list of image files
    is_anomaly = detector.predict(images)  # score > threshold

The threshold is the ``config.threshold_quantile`` quantile (default 0.95) of the leave-one-out
scores of the normal training images, so about 5% of normal images are flagged.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from msad_jax import knn
from msad_jax.checkpointing import CheckpointError, RunCheckpoints
from msad_jax.data.images import decode_image, fit_square
from msad_jax.data.transforms import Preprocessing, make_preprocess_fn
from msad_jax.evaluation import features_of
from msad_jax.features import make_feature_extractor
from msad_jax.models import build_backbone
from msad_jax.train import DETECTOR_FILE, RUN_INFO_FILE, compute_dtype
from msad_jax.train_step import replicate_state

ImagesLike = np.ndarray | Sequence[str | os.PathLike]


def _read_images(images: ImagesLike, side: int) -> np.ndarray:
    """uint8 ``[N, side, side, 3]`` from an array or a list of image files."""
    if isinstance(images, np.ndarray):
        array = images
        if array.ndim == 3:
            array = np.repeat(array[..., None], 3, axis=-1)
        if array.ndim != 4 or array.shape[-1] not in (1, 3, 4) or array.dtype != np.uint8:
            raise ValueError(
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
            decoded.append(fit_square(decode_image(handle.read(), os.fspath(path)), side))
    if not decoded:
        raise ValueError("No images given.")
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

        Raises:
          FileNotFoundError: ``workdir`` holds no finished run (or holds per-class subfolders).
          CheckpointError: the checkpoint cannot be read.
        """
        workdir = os.fspath(workdir)
        info_path = os.path.join(workdir, RUN_INFO_FILE)
        detector_path = os.path.join(workdir, DETECTOR_FILE)
        if not (os.path.isfile(info_path) and os.path.isfile(detector_path)):
            classes = sorted(d for d in os.listdir(workdir) if d.startswith("class_"))
            hint = f" (per-class runs: pass one of {workdir}/{classes[0]} ...)" if classes else ""
            raise FileNotFoundError(
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
        saved = np.load(detector_path)
        state = RunCheckpoints(os.path.join(workdir, "checkpoints")).restore_arrays()
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
        """Anomaly scores ``[N]``: summed squared distances to the k nearest normal images."""
        phi = self.features(images)
        return np.asarray(
            knn.knn_scores(
                self.gallery,
                phi,
                self.config.knn_k,
                memory_budget_bytes=self.config.knn_memory_budget_mb * 2**20,
            ),
            np.float64,
        )

    def predict(self, images: ImagesLike) -> np.ndarray:
        """bool ``[N]``: True where the score exceeds the threshold (an anomaly)."""
        return self.score(images) > self.threshold
