"""Glue for the Colab notebooks in ``colab/``: runtime checks, smoke mode and image folders.

The notebooks call the library for everything real (training, scoring, reports); this module only
holds what every notebook repeats:

- smoke mode: with the environment variable ``MSAD_JAX_NOTEBOOK_SMOKE=1`` a notebook runs with a
  tiny random-init model on synthetic (or self-written) images, offline, in well under a minute
  on a CPU -- that is how CI executes every notebook top to bottom (:func:`smoke_mode`,
  :func:`smoke_config`);
- which accelerator the runtime has (:func:`runtime_info`);
- writing small folders of synthetic images, and turning a folder of your own ``normal/`` and
  ``anomalous/`` images into the layout ``dataset='folder'`` reads (:func:`prepare_image_folder`);
- how a threshold quantile of the normal training scores trades false alarms against detections
  (:func:`threshold_tradeoff`).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import logging
import os
import shutil
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import ml_collections
import numpy as np
from PIL import Image

from msad_jax.config import validate_config
from msad_jax.data import synthetic
from msad_jax.data.folders import IMAGE_EXTENSIONS, natural_key

SMOKE_ENV_VAR = "MSAD_JAX_NOTEBOOK_SMOKE"

SMOKE_SETTINGS: dict[str, object] = {
    "dataset": "synthetic",
    "synthetic_size": 32,
    "synthetic_train": 128,
    "synthetic_test": 20,
    "backbone": "resnet_tiny",
    "pretrained": False,
    "offline": True,
    "dtype": "float32",
    "learning_rate": 0.01,  # random init moves little at the published 1e-5
    "batch_size": 32,
    "epochs": 2,
    "max_steps": 0,
    "eval_batch_size": 128,
    "checkpoint_every_steps": 0,
    "log_every_steps": 1,
    "progress": False,
}
"""Config values of smoke mode: a tiny random ResNet on synthetic gratings (as configs/smoke.py)."""

_PREPARED_MARKER = ".msad_jax_prepared"


def smoke_mode(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the notebook runs in smoke mode (``MSAD_JAX_NOTEBOOK_SMOKE=1``).

    Raises:
      ValueError: the variable is set to something other than '0', '1' or ''.
    """
    value = (os.environ if environ is None else environ).get(SMOKE_ENV_VAR, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{SMOKE_ENV_VAR}={value!r}: set it to 1 (smoke mode) or 0 / unset.")
    return value == "1"


def on_colab() -> bool:
    """Whether this Python runs in a Google Colab runtime."""
    return importlib.util.find_spec("google.colab") is not None


@dataclasses.dataclass(frozen=True)
class RuntimeInfo:
    """The accelerator JAX sees.

    Attributes:
      platform: JAX backend: 'cpu', 'gpu' or 'tpu'.
      device_kind: e.g. 'Tesla T4', 'TPU v2', 'cpu'.
      device_count: devices of all processes.
      local_device_count: devices of this process (what the pmapped steps use).
      process_count: JAX processes (1 on Colab).
      on_colab: running in Google Colab.
      host_accelerator: 'gpu' or 'tpu' when the machine has one (whether or not JAX uses it),
        else ''.
    """

    platform: str
    device_kind: str
    device_count: int
    local_device_count: int
    process_count: int
    on_colab: bool
    host_accelerator: str = ""

    def describe(self) -> str:
        """One line for the notebook, with a hint when a real run would land on a CPU."""
        where = "Colab" if self.on_colab else "local"
        line = (
            f"{where} runtime: {self.local_device_count} x {self.device_kind} "
            f"({self.platform}; {self.device_count} device(s), {self.process_count} process(es))"
        )
        if self.platform == "cpu" and self.host_accelerator:
            extra = "cuda12" if self.host_accelerator == "gpu" else "tpu"
            line += (
                f". This machine has a {self.host_accelerator.upper()} that JAX does not use: "
                f"run `pip install -U 'jax[{extra}]'` and restart the runtime."
            )
        elif self.platform == "cpu":
            line += (
                ". CPU only: full runs take many hours; on Colab choose Runtime > Change runtime "
                "type > a GPU or TPU."
            )
        return line


def host_accelerator() -> str:
    """'gpu' (an NVIDIA driver), 'tpu' (TPU device files) or '' -- without asking JAX."""
    if shutil.which("nvidia-smi"):
        return "gpu"
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return "tpu"
    return ""


def runtime_info() -> RuntimeInfo:
    """Which devices JAX uses in this runtime (initialises JAX's backend)."""
    import jax

    devices = jax.local_devices()
    return RuntimeInfo(
        platform=jax.default_backend(),
        device_kind=devices[0].device_kind,
        device_count=jax.device_count(),
        local_device_count=len(devices),
        process_count=jax.process_count(),
        on_colab=on_colab(),
        host_accelerator=host_accelerator(),
    )


def smoke_config(config: ml_collections.ConfigDict, **changes: object) -> ml_collections.ConfigDict:
    """A copy of ``config`` with :data:`SMOKE_SETTINGS`, then ``changes``, applied (validated).

    Args:
      config: the notebook's real configuration (from ``msad_jax.config.default_config``).
      **changes: smoke-mode values that differ from :data:`SMOKE_SETTINGS`, e.g.
        ``dataset='folder', data_dir=...`` for images the notebook wrote itself.

    Returns:
      The smoke configuration; ``config`` is not modified.
    """
    smoke = ml_collections.ConfigDict(config.to_dict())
    smoke.update({**SMOKE_SETTINGS, **changes})
    return validate_config(smoke)


def enable_compilation_cache(directory: str | os.PathLike) -> str:
    """Turns on JAX's persistent compilation cache unless a cache directory is already set.

    Several runs of the same model (the classes of a table, a restarted Colab runtime) then
    compile once. ``$JAX_COMPILATION_CACHE_DIR`` or an earlier setting takes precedence.

    Returns:
      The cache directory in use.
    """
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    path = os.path.abspath(os.fspath(directory))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def show_library_logs(level: int = logging.INFO) -> None:
    """Shows msad_jax's progress messages (ROC-AUC per epoch) in the notebook.

    The lines are written with ``tqdm.write`` (:func:`msad_jax.console.log_to_console`), so they
    stay clear of a progress bar; calling this again keeps one handler.
    """
    from msad_jax.console import log_to_console

    log_to_console(level=level, fmt="%(message)s", datefmt=None)


# --------------------------------------------------------------------------------------------
# Image folders.


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in ``folder`` (natural sort; hidden files skipped).

    Raises:
      FileNotFoundError: ``folder`` is not a directory.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of images; check the path.")
    files = [
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    ]
    return sorted(files, key=lambda p: natural_key(p.name))


def write_images(
    folder: str | os.PathLike, images: np.ndarray, *, prefix: str = "image"
) -> list[Path]:
    """Writes uint8 ``[N, H, W, 3]`` images as ``<prefix>_<i>.png`` files into ``folder``."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{prefix}_{i:04d}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def write_synthetic_images(
    folder: str | os.PathLike,
    class_index: int,
    count: int,
    *,
    size: int = 32,
    seed: int = 0,
    prefix: str = "image",
) -> list[Path]:
    """Writes ``count`` synthetic grating images of one class (see ``msad_jax.data.synthetic``)."""
    if not 0 <= class_index < len(synthetic.CLASS_NAMES):
        raise ValueError(
            f"class_index={class_index}: synthetic classes are 0..{len(synthetic.CLASS_NAMES) - 1}."
        )
    labels = np.full((count,), class_index)
    images = synthetic.grating_images(labels, size, np.random.default_rng(seed))
    return write_images(folder, images, prefix=prefix)


def write_class_folders(
    root: str | os.PathLike,
    classes: Sequence[int],
    *,
    train_per_class: int,
    test_per_class: int,
    size: int = 32,
    seed: int = 0,
) -> Path:
    """Writes synthetic classes in the class-per-folder layout ``root/{train,test}/<name>/``.

    Returns:
      ``root``, ready for ``dataset='folder'``.
    """
    root = Path(root)
    for offset, c in enumerate(classes):
        name = synthetic.CLASS_NAMES[c]
        for split, count, split_seed in (
            ("train", train_per_class, 0),
            ("test", test_per_class, 1),
        ):
            write_synthetic_images(
                root / split / name,
                c,
                count,
                size=size,
                seed=seed + 1000 * offset + split_seed,
            )
    return root


@dataclasses.dataclass(frozen=True)
class PreparedImages:
    """Your images, ready for training and scoring.

    Attributes:
      data_dir: folder in a layout that ``dataset='folder'`` reads (``config.data_dir``).
      new_images: image files of the optional ``new/`` folder (to score after training).
      layout: 'split' (the source already had train/ and test/) or 'normal+anomalous'.
      counts: number of images per part.
    """

    data_dir: Path
    new_images: list[Path]
    layout: str
    counts: dict[str, int]


def _source_root(source: Path, dest: Path) -> Path:
    """The folder holding train/ or normal/: extracts a zip, enters a single top folder."""
    if source.is_file() and zipfile.is_zipfile(source):
        extracted = dest / "extracted"
        if extracted.exists():
            shutil.rmtree(extracted)
        with zipfile.ZipFile(source) as archive:
            archive.extractall(extracted)
        source = extracted
    if not source.is_dir():
        raise FileNotFoundError(f"{source} is neither a folder nor a .zip file of images.")
    root = source
    while not any((root / name).is_dir() for name in ("train", "normal")):
        children = [p for p in root.iterdir() if not p.name.startswith((".", "__MACOSX"))]
        if len(children) != 1 or not children[0].is_dir():
            break
        root = children[0]
    return root


def _copy_all(files: Sequence[Path], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for path in files:
        shutil.copy2(path, folder / path.name)


def prepare_image_folder(
    source: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> PreparedImages:
    """Arranges a folder (or .zip) of your images for ``dataset='folder'``.

    Two source layouts are accepted:

    - ``normal/`` (your normal images), ``anomalous/`` (a few known anomalies) and optionally
      ``new/`` (images to score later): a random ``test_fraction`` of the normal images is held
      out, and ``dest/dataset/`` gets ``train/normal/``, ``test/normal/`` and
      ``test/anomalous/`` (copies). The anomalies are only used to measure ROC-AUC, never for
      training.
    - the library's own layouts with ``train/`` and ``test/`` (see ``msad_jax.data.folders``;
      an MVTec AD category works as is): used in place, with the optional ``new/`` beside them.

    Args:
      source: folder or .zip file (a zip is extracted to ``dest/extracted/``; a single top-level
        folder is entered).
      dest: working folder for the arranged copy.
      test_fraction: share of the normal images held out for testing.
      seed: seed of the hold-out split.

    Returns:
      The :class:`PreparedImages`.

    Raises:
      FileNotFoundError: ``source`` does not exist.
      ValueError: the layout is not one of the above, or there are too few images.
    """
    source, dest = Path(source), Path(dest)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must lie in (0, 1).")
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist; upload or mount your images first.")
    root = _source_root(source, dest)
    new_images = list_images(root / "new") if (root / "new").is_dir() else []
    if (root / "train").is_dir():
        counts = {"new": len(new_images)}
        return PreparedImages(root, new_images, "split", counts)
    if not (root / "normal").is_dir():
        raise ValueError(
            f"{root} has neither normal/ (+ anomalous/) nor train/ + test/ folders; put your "
            "normal images in normal/ and a few known anomalies in anomalous/."
        )
    normal = list_images(root / "normal")
    anomalous = list_images(root / "anomalous") if (root / "anomalous").is_dir() else []
    if not anomalous:
        raise ValueError(
            f"{root}/anomalous/ is missing or empty: add a few anomalous images (the run measures "
            "ROC-AUC on held-out normal and anomalous images; they are not used for training)."
        )
    n_test = max(1, int(round(test_fraction * len(normal))))
    if len(normal) - n_test < 4:
        raise ValueError(
            f"{root}/normal/ has {len(normal)} images; give at least {4 + n_test} (a few dozen "
            "or more for a useful detector)."
        )
    order = np.random.default_rng(seed).permutation(len(normal))
    test_normal = [normal[i] for i in sorted(order[:n_test])]
    train_normal = [normal[i] for i in sorted(order[n_test:])]
    data_dir = dest / "dataset"
    if data_dir.exists():
        if not (data_dir / _PREPARED_MARKER).exists():
            raise ValueError(f"{data_dir} exists and was not written here; choose another dest.")
        shutil.rmtree(data_dir)
    _copy_all(train_normal, data_dir / "train" / "normal")
    _copy_all(test_normal, data_dir / "test" / "normal")
    _copy_all(anomalous, data_dir / "test" / "anomalous")
    (data_dir / _PREPARED_MARKER).touch()
    counts = {
        "train_normal": len(train_normal),
        "test_normal": len(test_normal),
        "test_anomalous": len(anomalous),
        "new": len(new_images),
    }
    return PreparedImages(data_dir, new_images, "normal+anomalous", counts)


# --------------------------------------------------------------------------------------------
# Thresholds.


def threshold_tradeoff(
    train_scores: np.ndarray,
    quantiles: Sequence[float],
    *,
    test_scores: np.ndarray | None = None,
    test_labels: np.ndarray | None = None,
    new_scores: np.ndarray | None = None,
) -> list[dict[str, float]]:
    """What each threshold quantile of the normal training scores flags (``score > threshold``).

    The threshold of quantile ``q`` is ``np.quantile(train_scores, q)``, so about ``1 - q`` of
    normal images are false alarms. (:class:`msad_jax.detector.Detector` sets its threshold for a
    target false-positive rate ``fpr`` from the same leave-one-out scores, ``train_scores`` in
    ``detector.npz``, with the rank rule of :mod:`msad_jax.calibration`; ``Detector.with_fpr``
    gives another rate.)

    Args:
      train_scores: leave-one-out scores of the normal training images.
      quantiles: quantiles in (0, 1) to tabulate.
      test_scores: scores of labelled test images (optional).
      test_labels: their labels, 1 = anomaly (required with ``test_scores``).
      new_scores: scores of unlabelled new images (optional).

    Returns:
      One row per quantile: ``quantile``, ``threshold``, ``train_flagged`` (share of training
      images above it), and when given ``test_false_alarms`` (share of normal test images
      flagged), ``test_detected`` (share of anomalous test images flagged), ``new_flagged``
      (number of new images flagged).
    """
    train_scores = np.asarray(train_scores, np.float64)
    if train_scores.ndim != 1 or train_scores.size == 0:
        raise ValueError("train_scores must be a non-empty 1-D array.")
    if (test_scores is None) != (test_labels is None):
        raise ValueError("Give test_scores and test_labels together.")
    if test_scores is not None:
        test_scores = np.asarray(test_scores, np.float64)
        labels = np.asarray(test_labels)
        if test_scores.shape != labels.shape:
            raise ValueError(
                f"test_scores {test_scores.shape} and test_labels {labels.shape} differ in shape."
            )
    rows = []
    for q in quantiles:
        if not 0.0 < q < 1.0:
            raise ValueError(f"quantile {q} must lie in (0, 1).")
        threshold = float(np.quantile(train_scores, q))
        row = {
            "quantile": float(q),
            "threshold": threshold,
            "train_flagged": float(np.mean(train_scores > threshold)),
        }
        if test_scores is not None:
            normal, anomalous = test_scores[labels == 0], test_scores[labels == 1]
            row["test_false_alarms"] = float(np.mean(normal > threshold)) if normal.size else np.nan
            row["test_detected"] = (
                float(np.mean(anomalous > threshold)) if anomalous.size else np.nan
            )
        if new_scores is not None:
            row["new_flagged"] = int(np.sum(np.asarray(new_scores) > threshold))
        rows.append(row)
    return rows


_COLUMNS = {
    "quantile": ("quantile q", "{:.3f}"),
    "threshold": ("threshold", "{:.4g}"),
    "train_flagged": ("normal train flagged", "{:.1%}"),
    "test_false_alarms": ("normal test flagged (false alarms)", "{:.1%}"),
    "test_detected": ("anomalous test flagged (detected)", "{:.1%}"),
    "new_flagged": ("new images flagged", "{:d}"),
}


def tradeoff_markdown(rows: Sequence[Mapping[str, float]]) -> str:
    """A Markdown table of :func:`threshold_tradeoff` rows."""
    if not rows:
        raise ValueError("No rows to show.")
    keys = [k for k in _COLUMNS if k in rows[0]]
    lines = [
        "| " + " | ".join(_COLUMNS[k][0] for k in keys) + " |",
        "|" + "---:|" * len(keys),
    ]
    for row in rows:
        lines.append("| " + " | ".join(_COLUMNS[k][1].format(row[k]) for k in keys) + " |")
    return "\n".join(lines) + "\n"
