"""The main job: fine-tune with MSC on one normal class (or each in turn) and evaluate.

:func:`train_and_evaluate` is what ``python -m msad_jax.main`` runs and what notebooks call. For
one normal class it does, in order (SPEC §3-7):

1. load the one-class data and the backbone with its pretrained weights;
2. evaluate at epoch 0 (kNN on the pretrained features) and compute the center from the same pass;
3. train for ``config.epochs`` epochs with the pmapped MSC step, evaluating after every
   ``config.eval_every_epochs`` epochs (logged only: nothing is selected on test data) and always
   after the last one;
4. write the report (JSON + Markdown), plots, and what :class:`msad_jax.detector.Detector` needs.

Checkpoints are written every ``config.checkpoint_every_steps`` steps and after every epoch; a run
started again in the same ``workdir`` resumes from the newest one (parameters, optimizer state,
step, PRNG key, center, position in the epoch's data order and the evaluation history) and ends
with the same parameters as an uninterrupted run. A damaged checkpoint (see
:mod:`msad_jax.checkpointing`) is reported in one line, moved to ``<workdir>/damaged_checkpoints/``
and the run resumes from the newest intact one. A NaN loss, or parameters that give NaN features,
stop the run with :class:`TrainingDivergedError` before anything NaN is checkpointed.

A workdir belongs to one run: its lock (:mod:`msad_jax.workdir`) keeps a second run out while one
is running, and a run started again must agree with the first on everything that defines the
result (:func:`run_identity`: the recipe, the data source with a fingerprint of a folder's files,
the image size, the subsets); otherwise it stops with one line before writing anything. It may
ask for more epochs: ``detector.npz`` and the reports always describe one checkpoint (its step is
recorded, and that checkpoint is kept until they are rewritten).

With ``config.normal_class = 'all'`` each class runs in ``<workdir>/class_<i>_<name>/`` and the
per-class table (with the published numbers beside ours) goes to ``<workdir>/report.{md,csv}``.

Multi-host (:mod:`msad_jax.distributed`, one process per host, ``jax.distributed`` initialised
first): ``config.batch_size`` is the global batch over the devices of all processes; each process
reads its slice of every global batch; the pmapped step's collectives span all devices, so the
loss, gradients and center are global; evaluation gathers the features of all processes; every
process takes part in saving and restoring checkpoints (orbax; process 0 writes the host arrays),
and process 0 alone writes reports, plots, metrics and the detector file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from msad_jax import calibration, distributed, evaluation, knn, plots, reporting
from msad_jax.checkpointing import (
    CheckpointError,
    DamagedCheckpointError,
    RunCheckpoints,
    non_finite_items,
)
from msad_jax.config import ConfigError, compute_dtype, validate_config
from msad_jax.data import augment, folders, pipeline, protocols, subsets, synthetic, transforms
from msad_jax.errors import UserError
from msad_jax.features import make_feature_extractor
from msad_jax.metric_writer import MetricWriter
from msad_jax.models import (
    BackboneSpec,
    backbone_spec,
    build_backbone,
    init_variables,
    load_pretrained,
)
from msad_jax.optimizer import make_optimizer
from msad_jax.run_files import (
    DETECTOR_FILE,
    RUN_INFO_FILE,
    flatten_variables,
    write_detector_file,
)
from msad_jax.train_step import TrainState, make_train_step, pmap_train_step, replicate_state
from msad_jax.workdir import WorkdirBusyError, WorkdirLock, check_workdir_path

PyTree = Any
logger = logging.getLogger(__name__)

# Config keys that change what a checkpoint means; a resumed run must agree on them.
RESUME_KEYS = (
    "dataset",
    "normal_class",
    "train_images",
    "test_images",
    "backbone",
    "pretrained",
    "frozen",
    "loss",
    "angular",
    "temperature",
    "learning_rate",
    "weight_decay",
    "batch_size",
    "seed",
    "dtype",
    "resize",
    "crop",
    "resize_method",
    "calibration_holdout",
)
SYNTHETIC_KEYS = ("synthetic_size", "synthetic_train", "synthetic_test")
DAMAGED_DIR = "damaged_checkpoints"


class TrainingDivergedError(UserError, RuntimeError):
    """The training loss, or the model's features, became NaN or infinite."""


class _NullWriter:
    """Stands in for :class:`MetricWriter` on processes other than 0 (they write nothing)."""

    def write(self, record: Any, *, step: int, prefix: str = "") -> None:
        del record, step, prefix

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------
# Resolving the configuration.


def preprocessing_for(
    config: ml_collections.ConfigDict, spec: BackboneSpec
) -> transforms.Preprocessing:
    """The backbone's evaluation preprocessing with the config's overrides applied."""
    prep = spec.preprocessing
    changes: dict[str, Any] = {}
    if config.resize:
        changes["resize"] = config.resize
    if config.crop >= 0:
        changes["crop"] = config.crop or None
    if config.resize_method:
        changes["method"] = config.resize_method
    try:
        return dataclasses.replace(prep, **changes)
    except ValueError as err:
        raise ConfigError(f"Invalid preprocessing override: {err}") from None


def frozen_patterns(config: ml_collections.ConfigDict, spec: BackboneSpec) -> tuple[str, ...]:
    """Regexes of frozen parameters: the backbone's default or the config's list."""
    if config.frozen == "default":
        return spec.frozen
    return tuple(p.strip() for p in config.frozen.split(",") if p.strip())


def class_names(config: ml_collections.ConfigDict) -> list[str]:
    """Names of the dataset's classes (reads folder layouts / TFDS metadata)."""
    if config.dataset == "synthetic":
        return list(synthetic.CLASS_NAMES)
    if config.dataset == "folder":
        return protocols.class_names("folder", path=config.data_dir)
    return protocols.class_names(config.dataset)


def training_steps(config: ml_collections.ConfigDict, num_train_images: int) -> tuple[int, int]:
    """``(steps_per_epoch, total_steps)``: the epochs' steps, capped by ``config.max_steps``."""
    steps_per_epoch = pipeline.steps_per_epoch(num_train_images, config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    return steps_per_epoch, total_steps


def normal_classes(config: ml_collections.ConfigDict) -> list[int]:
    """The normal classes to run: one, or all of them for ``normal_class='all'``."""
    names = class_names(config)
    value = str(config.normal_class)
    if value == "all":
        return list(range(len(names)))
    if re.fullmatch(r"\d+", value):
        index = int(value)
        if index >= len(names):
            raise ConfigError(
                f"config.normal_class={index} is out of range: {config.dataset} has "
                f"{len(names)} classes (0..{len(names) - 1})."
            )
        return [index]
    if value in names:
        return [names.index(value)]
    raise ConfigError(
        f"config.normal_class={value!r} is not a class of {config.dataset}; use an index, 'all', "
        f"or one of {', '.join(names)}."
    )


def load_data(config: ml_collections.ConfigDict, normal_class: int) -> protocols.OneClassData:
    """The one-class problem of ``normal_class`` from the configured source (and subset)."""
    if config.dataset == "synthetic":
        arrays = synthetic.synthetic_arrays(
            size=config.synthetic_size,
            train_per_class=config.synthetic_train,
            test_per_class=config.synthetic_test,
            seed=config.seed,
        )
        data = protocols.load_one_class("arrays", normal_class, arrays=arrays)
    else:
        data = protocols.load_one_class(
            config.dataset,
            normal_class,
            data_dir=config.data_dir or None,
            path=config.data_dir or None,
            image_size=config.image_size or None,
            download=config.download,
            manual_dir=config.manual_dir or None,
        )
    return subsets.subsample(
        data, train_images=config.train_images, test_images=config.test_images, seed=config.seed
    )


def model_and_variables(
    config: ml_collections.ConfigDict,
) -> tuple[Any, dict[str, PyTree], BackboneSpec]:
    """The backbone (compute dtype from the config) and its initial variables."""
    spec = backbone_spec(config.backbone)
    model = build_backbone(config.backbone, dtype=compute_dtype(config))
    if config.pretrained:
        variables = load_pretrained(
            config.backbone,
            config.weights_cache or None,
            offline=True if config.offline else None,
        )
    else:
        variables = init_variables(model, spec.preprocessing.size, seed=config.seed)
    return model, variables, spec


# --------------------------------------------------------------------------------------------
# Training-state plumbing.


def _host_state(state: TrainState, center: np.ndarray) -> dict[str, PyTree]:
    """The checkpointed pytree: device 0's copy of the replicated state, plus the center."""
    single = jax.device_get(jax.tree.map(lambda x: x[0], state))
    return {
        "params": single.params,
        "batch_stats": single.batch_stats,
        "opt_state": single.opt_state,
        "step": np.asarray(single.step),
        "rng": np.asarray(jax.random.key_data(single.rng)),
        "center": np.asarray(center, np.float32),
    }


def _train_state(host: dict[str, PyTree]) -> TrainState:
    return TrainState(
        params=host["params"],
        batch_stats=host["batch_stats"],
        opt_state=host["opt_state"],
        step=jnp.asarray(host["step"], jnp.int32),
        rng=jax.random.wrap_key_data(jnp.asarray(host["rng"])),
    )


def run_identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What makes a workdir's result what it is; a resumed run must agree on all of it.

    The :data:`RESUME_KEYS`, ``image_size``, and the data source: the sizes of the synthetic
    data; the TFDS data_dir; for ``folder``, the folder's absolute path and the fingerprint of
    its files (:func:`msad_jax.data.folders.file_list_fingerprint`).
    """
    identity: dict[str, Any] = {key: config[key] for key in RESUME_KEYS}
    identity["image_size"] = config.image_size
    if config.dataset == "synthetic":
        identity.update({key: config[key] for key in SYNTHETIC_KEYS})
    elif config.dataset != "digits":
        identity["data_dir"] = os.path.abspath(config.data_dir) if config.data_dir else ""
    if config.dataset == "folder":
        identity["data_files"] = folders.file_list_fingerprint(config.data_dir)
    return identity


def _saved_identity(record: dict[str, Any]) -> dict[str, Any]:
    """The identity stored in a checkpoint's progress or in run.json (older runs: their config).

    Runs of versions without ``calibration_holdout`` held out no training images.
    """
    if "identity" in record:
        identity = dict(record["identity"])
    else:
        config = record.get("config", {})
        identity = {key: config[key] for key in RESUME_KEYS if key in config}
    identity.setdefault("calibration_holdout", 0.0)
    return identity


def _check_identity(saved: dict[str, Any], identity: dict[str, Any]) -> None:
    changed = [k for k in identity if k in saved and saved[k] != identity[k]]
    if changed:
        details = ", ".join(
            "the data folder's files (names or sizes)"
            if k == "data_files"
            else f"{k}: {saved[k]!r} -> {identity[k]!r}"
            for k in changed
        )
        raise CheckpointError(
            f"The workdir holds a run with a different config ({details}); nothing was written. "
            "Use a new --workdir, or the original settings and data."
        )


def _check_run_info(workdir: str, identity: dict[str, Any]) -> None:
    """Compares with ``run.json`` of an earlier run in ``workdir``, before anything is written."""
    path = os.path.join(workdir, RUN_INFO_FILE)
    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as handle:
            info = json.load(handle)
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} cannot be read ({type(err).__name__}: {err}); use a new --workdir."
        ) from err
    _check_identity(_saved_identity(info), identity)


@dataclasses.dataclass
class _PendingMetrics:
    """Per-step metrics kept on device and fetched in groups (no host sync every step)."""

    steps: list[int] = dataclasses.field(default_factory=list)
    values: list[dict[str, jax.Array]] = dataclasses.field(default_factory=list)

    def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
        self.steps.append(step)
        self.values.append(metrics)

    def drain(self) -> list[tuple[int, dict[str, float]]]:
        fetched = jax.device_get(self.values)
        out = [
            (step, {k: float(np.asarray(v)[0]) for k, v in m.items()})
            for step, m in zip(self.steps, fetched, strict=True)
        ]
        self.steps.clear()
        self.values.clear()
        return out


# --------------------------------------------------------------------------------------------
# One normal class.


@dataclasses.dataclass
class _Run:
    """Everything one class's run needs, built once."""

    config: ml_collections.ConfigDict
    workdir: str
    data: protocols.OneClassData
    holdout_images: np.ndarray  # normal training images held out for calibration (may be empty)
    model: Any
    extractor: Any
    step_fn: Any
    steps_per_epoch: int
    total_steps: int
    writer: MetricWriter
    checkpoints: RunCheckpoints

    def evaluate(self, state: TrainState, *, center: bool = False) -> evaluation.Evaluation:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        try:
            return evaluation.evaluate(
                self.extractor,
                variables,
                self.data,
                k=self.config.knn_k,
                batch_size=self.config.eval_batch_size,
                memory_budget_bytes=self.config.knn_memory_budget_mb * 2**20,
                center=center,
                normalize_center=self.config.angular,
            )
        except evaluation.NonFiniteFeaturesError as err:
            step = int(jax.device_get(state.step[0]))
            raise _diverged(
                self, f"At step {step} the model's features became NaN ({err})"
            ) from err


def _log_eval(run: _Run, epoch: int, step: int, result: evaluation.Evaluation) -> dict[str, Any]:
    record = {"epoch": epoch, "step": step, **result.metrics}
    run.writer.write(record, step=step, prefix="eval/")
    logger.info(
        "epoch %d: ROC-AUC %.2f%%  AP %.2f%%  FPR@95TPR %.2f%%",
        epoch,
        100 * result.metrics["auroc"],
        100 * result.metrics["average_precision"],
        100 * result.metrics["fpr_at_95_tpr"],
    )
    return record


def _diverged(run: _Run, what: str) -> TrainingDivergedError:
    last = run.checkpoints.latest_step()
    return TrainingDivergedError(
        f"{what}; stopped without saving it. The last good checkpoint (step {last}) is in "
        f"{run.checkpoints.directory}. A resumed run must keep its settings, so start a new "
        "--workdir with a lower config.learning_rate (and config.dtype='float32' if it was "
        "bfloat16)."
    )


def _check_finite(records: Sequence[tuple[int, dict[str, float]]], run: _Run) -> None:
    for step, values in records:
        if not math.isfinite(values["loss"]):
            raise _diverged(run, f"The training loss became {values['loss']} at step {step}")


def _checked_host_state(run: _Run, state: TrainState, center: np.ndarray) -> dict[str, PyTree]:
    """:func:`_host_state`, refusing parameters that are no longer finite."""
    host = _host_state(state, center)
    if non_finite_items(host):
        raise _diverged(run, f"The parameters became NaN or infinite by step {int(host['step'])}")
    return host


def _epoch_batches(run: _Run, epoch: int, start: int) -> Iterator[dict[str, jax.Array]]:
    batches = pipeline.train_batches(
        run.data.train_images,
        global_batch_size=run.config.batch_size,
        num_devices=jax.local_device_count(),
        seed=run.config.seed,
        epoch=epoch,
        start_step=start,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    return pipeline.prefetch_to_device(batches, size=2)


def _train_epoch(
    run: _Run,
    state: TrainState,
    center: jax.Array,
    epoch: int,
    start: int,
    progress: dict[str, Any],
    bar: tqdm.tqdm,
) -> tuple[TrainState, list[float]]:
    """Runs the steps of one epoch from ``start``; returns the state and the epoch's losses."""
    config = run.config
    pending = _PendingMetrics()
    losses: list[float] = list(progress.get("epoch_losses", []))
    global_step = epoch * run.steps_per_epoch + start

    def flush() -> None:
        records = pending.drain()
        _check_finite(records, run)
        for step, values in records:
            losses.append(values["loss"])
            run.writer.write({"step": step, "epoch": epoch, **values}, step=step, prefix="train/")
        if records:
            bar.set_postfix(loss=f"{records[-1][1]['loss']:.4f}", epoch=epoch)

    for offset, batch in enumerate(_epoch_batches(run, epoch, start)):
        if global_step >= run.total_steps:
            break
        state, metrics = run.step_fn(state, batch, center)
        global_step += 1
        pending.add(global_step, {k: metrics[k] for k in ("loss", "align", "uniform", "angular")})
        bar.update(1)
        done_in_epoch = start + offset + 1
        if global_step % config.log_every_steps == 0:
            flush()
        every = config.checkpoint_every_steps
        if every and global_step % every == 0 and done_in_epoch < run.steps_per_epoch:
            flush()
            run.checkpoints.save(
                global_step,
                _checked_host_state(run, state, center),
                {
                    **progress,
                    "epoch": epoch,
                    "step_in_epoch": done_in_epoch,
                    "epoch_losses": losses,
                },
            )
    flush()
    return state, losses


def _write_atomically(path: str, write: Any, mode: str = "w") -> None:
    """Writes ``path`` through a temporary file renamed over it (a kill leaves the old one)."""
    temporary = f"{path}.tmp"
    encoding = None if "b" in mode else "utf-8"
    with open(temporary, mode, encoding=encoding) as handle:
        write(handle)
    os.replace(temporary, path)


def recorded_detector_step(workdir: str) -> int | None:
    """The checkpoint step ``<workdir>/detector.npz`` was built from (None: none recorded)."""
    try:
        with np.load(os.path.join(workdir, DETECTOR_FILE)) as saved:
            return int(saved["checkpoint_step"]) if "checkpoint_step" in saved else None
    except (OSError, ValueError, KeyError, EOFError):
        return None


def _calibration_scores(
    run: _Run, variables: PyTree, gallery: np.ndarray, train_scores: np.ndarray
) -> tuple[str, np.ndarray]:
    """``(method, scores)`` of the normal images the threshold is calibrated on.

    The held-out normal training images (scored against the gallery by the final model) when
    there are any, else the gallery's leave-one-out scores.
    """
    if not len(run.holdout_images):
        return calibration.LEAVE_ONE_OUT, train_scores
    config = run.config
    phi = evaluation.features_of(
        run.extractor, variables, run.holdout_images, batch_size=config.eval_batch_size
    )
    try:
        evaluation.check_finite_features(phi, "held-out normal training images")
    except evaluation.NonFiniteFeaturesError as err:
        raise _diverged(run, f"The model's features became NaN ({err})") from err
    budget = config.knn_memory_budget_mb * 2**20
    scores = knn.knn_scores(gallery, phi, config.knn_k, memory_budget_bytes=budget)
    return calibration.HOLDOUT, np.asarray(scores, np.float64)


def _threshold_report(
    method: str, scores: np.ndarray, fpr: float, threshold: float, final: evaluation.Evaluation
) -> dict[str, Any]:
    """The threshold's part of the report: how it was set and what it flags on the test images."""
    labels = np.asarray(final.labels)
    return {
        "target_fpr": fpr,
        "method": method,
        "calibration_images": len(scores),
        "threshold": threshold,
        "test_fpr": calibration.flag_rate(final.scores[labels == 0], threshold),
        "test_recall": calibration.flag_rate(final.scores[labels == 1], threshold),
    }


def _write_outputs(
    run: _Run,
    final: evaluation.Evaluation,
    history: list[dict[str, Any]],
    step: int,
    state: TrainState,
) -> dict:
    """Report, plots and detector file of a finished class (written by process 0 only).

    ``step`` is the checkpoint whose parameters gave ``final`` (``state``, replicated); it is on
    disk before the detector file names it.
    """
    config, data = run.config, run.data
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    train_scores = evaluation.leave_one_out_scores(
        final.gallery, config.knn_k, memory_budget_bytes=config.knn_memory_budget_mb * 2**20
    )
    method, calibration_scores = _calibration_scores(run, variables, final.gallery, train_scores)
    fpr = float(config.threshold_fpr)
    threshold = calibration.threshold_at_fpr(calibration_scores, fpr)
    evals = [h for h in history if "auroc" in h]
    report = {
        "dataset": config.dataset,
        "normal_class": data.normal_class,
        "class_name": data.normal_class_name,
        "backbone": config.backbone,
        "loss": config.loss,
        "angular": config.angular,
        "epochs": config.epochs,
        "counts": data.counts(),
        "pretrained": {k: evals[0][k] for k in ("auroc", "average_precision", "fpr_at_95_tpr")},
        "final": dict(final.metrics),
        "history": history,
        "threshold": threshold,
        "threshold_quantile": 1.0 - fpr,  # the name of earlier versions, for their readers
        "calibration": _threshold_report(method, calibration_scores, fpr, threshold, final),
        "checkpoint_step": step,
    }
    run.checkpoints.wait()
    if not distributed.is_main_process():
        return report  # every process has the same report; process 0 writes it
    host_variables = jax.device_get(jax.tree.map(lambda x: x[0], variables))
    write_detector_file(
        os.path.join(run.workdir, DETECTOR_FILE),
        {
            "gallery": final.gallery,
            "train_scores": train_scores,
            "calibration_scores": calibration_scores,
            "calibration": np.asarray(method),
            "target_fpr": np.asarray(fpr),
            "test_scores": final.scores,
            "test_labels": final.labels,
            "threshold": np.asarray(threshold),
            "image_side": np.asarray(data.train_images.shape[1]),
            "knn_k": np.asarray(config.knn_k),
            "checkpoint_step": np.asarray(step),
            **flatten_variables(host_variables),
        },
    )
    _write_atomically(
        os.path.join(run.workdir, "report.json"),
        lambda handle: json.dump(report, handle, indent=2),
    )
    _write_atomically(
        os.path.join(run.workdir, "report.md"),
        lambda handle: handle.write(_class_markdown(report)),
    )
    if config.plots:
        title = f"{config.dataset} class {data.normal_class} ({data.normal_class_name})"
        plots.plot_roc(final.labels, final.scores, os.path.join(run.workdir, "roc.png"), title)
        plots.plot_score_histograms(
            final.labels,
            final.scores,
            os.path.join(run.workdir, "scores.png"),
            title,
            threshold=threshold,
        )
        trained = [h for h in history if h.get("mean_loss") is not None]
        plots.plot_training_curves(
            [h["epoch"] for h in evals],
            [h["auroc"] for h in evals],
            [h["epoch"] for h in trained],
            [h["mean_loss"] for h in trained],
            os.path.join(run.workdir, "training.png"),
            title,
        )
    return report


def _threshold_markdown(calibrated: dict[str, Any]) -> str:
    source = {
        calibration.LEAVE_ONE_OUT: "leave-one-out scores of the {n} normal training images",
        calibration.HOLDOUT: "{n} normal training images held out from training and gallery",
    }[calibrated["method"]].format(n=calibrated["calibration_images"])
    return (
        f"Threshold {calibrated['threshold']:.6g}, set for a false-positive rate of "
        f"{100 * calibrated['target_fpr']:.3g}% from the {source}. On the test images it flags "
        f"{100 * calibrated['test_fpr']:.2f}% of the normal ones (false positives) and "
        f"{100 * calibrated['test_recall']:.2f}% of the anomalous ones."
    )


def _class_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# {report['dataset']}: normal class {report['normal_class']} ({report['class_name']})",
        "",
        f"Backbone {report['backbone']}, loss {report['loss']}"
        f"{' + angular' if report['angular'] else ''}, {report['epochs']} epochs. "
        f"Counts: {report['counts']}.",
        "",
        "| epoch | ROC-AUC % | AP % | FPR@95TPR % | mean loss |",
        "|---|---|---|---|---|",
    ]
    for h in report["history"]:
        if "auroc" not in h:
            continue
        loss = "" if h.get("mean_loss") is None else f"{h['mean_loss']:.4f}"
        lines.append(
            f"| {h['epoch']} | {100 * h['auroc']:.2f} | {100 * h['average_precision']:.2f} | "
            f"{100 * h['fpr_at_95_tpr']:.2f} | {loss} |"
        )
    lines += ["", _threshold_markdown(report["calibration"]), ""]
    return "\n".join(lines)


def split_holdout(
    config: ml_collections.ConfigDict, data: protocols.OneClassData
) -> tuple[protocols.OneClassData, np.ndarray]:
    """``(data without the held-out images, held-out images)`` for ``config.calibration_holdout``.

    A seeded fraction of the normal training images is kept out of training and of the gallery,
    to calibrate the threshold on (none when the fraction is 0).
    """
    if not config.calibration_holdout:
        return data, data.train_images[:0]
    keep, held = calibration.holdout_split(
        len(data.train_images), config.calibration_holdout, config.seed
    )
    kept = dataclasses.replace(data, train_images=data.train_images[keep])
    return kept, data.train_images[held]


def _check_enough_images(
    config: ml_collections.ConfigDict, data: protocols.OneClassData, held_out: int
) -> None:
    if len(data.train_images) <= config.knn_k:
        raise ConfigError(
            f"config.knn_k={config.knn_k} needs more than {config.knn_k} training images; this "
            f"problem has {len(data.train_images)}: lower config.knn_k or use more images."
        )
    calibrating = held_out or len(data.train_images)
    needed = calibration.min_calibration_scores(config.threshold_fpr)
    if calibrating < needed:
        what = "held-out" if held_out else "training"
        raise ConfigError(
            f"config.threshold_fpr={config.threshold_fpr} needs at least {needed} {what} normal "
            f"images to set the threshold from; this run has {calibrating}: raise "
            "config.threshold_fpr"
            + (" or config.calibration_holdout." if held_out else " or use more images.")
        )


def _initial_state(variables: dict[str, PyTree], tx: Any, seed: int) -> TrainState:
    return TrainState(
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(variables["params"]),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key(seed),
    )


def _template(fresh: TrainState, feature_dim: int) -> dict[str, PyTree]:
    """The shape of the checkpointed state (what :func:`_host_state` returns)."""
    return {
        "params": fresh.params,
        "batch_stats": fresh.batch_stats,
        "opt_state": fresh.opt_state,
        "step": np.zeros((), np.int32),
        "rng": np.asarray(jax.random.key_data(fresh.rng)),
        "center": np.zeros((feature_dim,), np.float32),
    }


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def restore_newest_intact(
    checkpoints: RunCheckpoints, template: dict[str, PyTree], identity: dict[str, Any], workdir: str
) -> tuple[dict[str, PyTree], dict[str, Any]] | None:
    """The newest intact checkpoint of this run, moving damaged ones aside; None if none is left.

    Each checkpoint's record is compared with ``identity`` first (a different run is refused, not
    moved). A damaged one is reported in one log line and moved to ``<workdir>/damaged_checkpoints``
    (by process 0; every process then sees the same checkpoints).

    Raises:
      CheckpointError: a checkpoint of a different run or model.
    """
    damaged = 0
    for step in reversed(checkpoints.all_steps()):
        try:
            _check_identity(_saved_identity(checkpoints.read_progress(step)), identity)
            return checkpoints.restore(template, step)
        except DamagedCheckpointError as err:
            damaged += 1
            if distributed.is_main_process():
                moved = checkpoints.move_aside(step, os.path.join(workdir, DAMAGED_DIR))
                logger.warning("%s; moved it to %s, trying the one before.", err, moved)
            _sync_processes(f"msad_jax_moved_checkpoint_{step}")
            checkpoints.reload()
    if damaged:
        logger.warning(
            "No intact checkpoint is left in %s; starting afresh.", checkpoints.directory
        )
    return None


def _write_run_info(
    workdir: str,
    config: ml_collections.ConfigDict,
    prep: transforms.Preprocessing,
    identity: dict[str, Any],
) -> None:
    info = {
        "config": config.to_dict(),
        "preprocessing": dataclasses.asdict(prep),
        "identity": identity,
    }
    _write_atomically(
        os.path.join(workdir, RUN_INFO_FILE), lambda handle: json.dump(info, handle, indent=2)
    )


def train_one_class(
    config: ml_collections.ConfigDict, workdir: str, normal_class: int
) -> dict[str, Any]:
    """Trains and evaluates with one normal class; resumes from ``workdir`` when possible.

    Nothing is written to ``workdir`` before the run is known to be this workdir's run (or the
    first one there).

    Returns:
      The report (also written to ``<workdir>/report.json``).

    Raises:
      CheckpointError: ``workdir`` holds a different run.
    """
    os.makedirs(workdir, exist_ok=True)
    identity = run_identity(config)
    _check_run_info(workdir, identity)
    data, holdout_images = split_holdout(config, load_data(config, normal_class))
    logger.info("%s", data.summary())
    if len(holdout_images):
        logger.info(
            "%d normal training images held out to calibrate the threshold.", len(holdout_images)
        )
    _check_enough_images(config, data, len(holdout_images))
    model, variables, spec = model_and_variables(config)
    prep = preprocessing_for(config, spec)
    frozen = frozen_patterns(config, spec)
    devices = jax.local_device_count() * jax.process_count()
    if config.batch_size % devices:
        raise ConfigError(
            f"config.batch_size={config.batch_size} must be a multiple of the {devices} devices"
            f"{' of all processes' if jax.process_count() > 1 else ''}."
        )
    tx = make_optimizer(
        variables["params"],
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        frozen=frozen,
    )
    step = make_train_step(
        model,
        tx,
        loss=config.loss,
        angular=config.angular,
        temperature=config.temperature,
        augment_fn=augment.make_augment_fn(prep),
        frozen=frozen,
    )
    steps_per_epoch, total_steps = training_steps(config, len(data.train_images))
    fresh = _initial_state(variables, tx, config.seed)
    detector_step = recorded_detector_step(workdir)
    checkpoints = RunCheckpoints(
        os.path.join(workdir, "checkpoints"),
        max_to_keep=config.keep_checkpoints,
        keep_steps=() if detector_step is None else (detector_step,),
    )
    writer: MetricWriter | _NullWriter = _NullWriter()
    try:
        resumed = restore_newest_intact(
            checkpoints, _template(fresh, model.feature_dim), identity, workdir
        )
        if distributed.is_main_process():
            resume_step = None if resumed is None else int(resumed[0]["step"])
            writer = MetricWriter(workdir, resume_step=resume_step)
            _write_run_info(workdir, config, prep, identity)
        run = _Run(
            config=config,
            workdir=workdir,
            data=data,
            holdout_images=holdout_images,
            model=model,
            extractor=make_feature_extractor(model, transforms.make_preprocess_fn(prep)),
            step_fn=pmap_train_step(step),
            steps_per_epoch=steps_per_epoch,
            total_steps=total_steps,
            writer=writer,
            checkpoints=checkpoints,
        )
        return _train_and_report(run, fresh, resumed, identity)
    finally:
        checkpoints.close()
        writer.close()


def _train_and_report(
    run: _Run,
    fresh: TrainState,
    resumed: tuple[dict[str, PyTree], dict[str, Any]] | None,
    identity: dict[str, Any],
) -> dict[str, Any]:
    config = run.config
    if resumed is not None:
        host, progress = resumed
        logger.info("Resuming from step %d (epoch %d).", int(host["step"]), progress["epoch"])
        state = replicate_state(_train_state(host))
        center_host = host["center"]
        progress = {**progress, "config": config.to_dict(), "identity": identity}
    else:
        state = replicate_state(fresh)
        t0 = time.perf_counter()
        result = run.evaluate(state, center=True)
        center_host = result.center
        record = _log_eval(run, 0, 0, result)
        record["seconds"] = time.perf_counter() - t0
        progress = {
            "epoch": 0,
            "step_in_epoch": 0,
            "history": [record],
            "config": config.to_dict(),
            "identity": identity,
        }
        run.checkpoints.save(0, _checked_host_state(run, state, center_host), progress)
        if run.total_steps == 0:
            return _write_outputs(run, result, progress["history"], 0, state)
    center = jnp.asarray(center_host)
    history: list[dict[str, Any]] = progress["history"]
    epoch, start = progress["epoch"], progress["step_in_epoch"]
    done = epoch * run.steps_per_epoch + start
    final: evaluation.Evaluation | None = None
    with tqdm.tqdm(
        total=run.total_steps,
        initial=done,
        desc="training",
        unit="step",
        disable=not (config.progress and distributed.is_main_process()),
    ) as bar:
        while epoch * run.steps_per_epoch + start < run.total_steps:
            t0 = time.perf_counter()
            state, losses = _train_epoch(run, state, center, epoch, start, progress, bar)
            seconds = time.perf_counter() - t0
            steps_done = int(jax.device_get(state.step[0]))
            last = steps_done >= run.total_steps
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "step": steps_done,
                "mean_loss": float(np.mean(losses)) if losses else None,
                "train_seconds": seconds,
            }
            if last or (config.eval_every_epochs and (epoch + 1) % config.eval_every_epochs == 0):
                final = run.evaluate(state)
                record.update(_log_eval(run, epoch + 1, steps_done, final))
            history.append(record)
            epoch, start = epoch + 1, 0
            progress = {
                **progress,
                "epoch": epoch,
                "step_in_epoch": 0,
                "history": history,
                "epoch_losses": [],
            }
            run.checkpoints.save(steps_done, _checked_host_state(run, state, center_host), progress)
    if final is None:  # resumed after the last epoch finished, or no training steps
        final = run.evaluate(state)
    return _write_outputs(run, final, history, int(jax.device_get(state.step[0])), state)


def _class_dir(workdir: str, index: int, name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    return os.path.join(workdir, f"class_{index:02d}_{safe}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs the configured experiment in ``workdir`` (see the module docstring).

    Args:
      config: a configuration from ``configs/`` (validated here).
      workdir: output folder; an existing run there is resumed.

    Returns:
      The report of the class, or for ``normal_class='all'`` a dict with the per-class reports
      and the mean ROC-AUC.
    """
    validate_config(config)
    workdir = os.path.abspath(workdir)
    check_workdir_path(workdir)
    classes = normal_classes(config)
    os.makedirs(workdir, exist_ok=True)
    lock = _lock_workdir(workdir)
    try:
        if str(config.normal_class) != "all":
            return train_one_class(config, workdir, classes[0])
        return _train_all_classes(config, workdir, classes)
    finally:
        if lock is not None:
            lock.release()


def _lock_workdir(workdir: str) -> WorkdirLock | None:
    """Takes the workdir lock on process 0 (others learn whether it succeeded)."""
    lock, error = None, None
    if distributed.is_main_process():
        lock = WorkdirLock(workdir)
        try:
            lock.acquire()
        except WorkdirBusyError as err:
            error = err
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        taken = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if not int(taken) and error is None:
            error = WorkdirBusyError(
                f"Process 0 could not take the lock of {workdir}: another run is using it."
            )
    if error is not None:
        raise error
    return lock


def _train_all_classes(
    config: ml_collections.ConfigDict, workdir: str, classes: list[int]
) -> dict[str, Any]:
    names = class_names(config)
    reports = []
    for index in classes:
        logger.info("=== normal class %d (%s) ===", index, names[index])
        reports.append(train_one_class(config, _class_dir(workdir, index, names[index]), index))
    results = [
        reporting.ClassResult(
            index=r["normal_class"],
            name=r["class_name"],
            auroc=r["final"]["auroc"],
            metrics={
                "pretrained_auroc": r["pretrained"]["auroc"],
                "average_precision": r["final"]["average_precision"],
                "fpr_at_95_tpr": r["final"]["fpr_at_95_tpr"],
            },
            epoch_auroc=[h["auroc"] for h in r["history"] if "auroc" in h],
        )
        for r in reports
    ]
    summary = {
        "dataset": config.dataset,
        "classes": reports,
        "mean_auroc": float(np.mean([r["final"]["auroc"] for r in reports])),
        "mean_pretrained_auroc": float(np.mean([r["pretrained"]["auroc"] for r in reports])),
        "report_markdown": "report.md",
        "report_csv": "report.csv",
    }
    if distributed.is_main_process():
        md_path, csv_path = reporting.write_report(
            config.dataset, results, os.path.join(workdir, "report"), backbone=config.backbone
        )
        summary.update(report_markdown=md_path.name, report_csv=csv_path.name)
        _write_atomically(
            os.path.join(workdir, "report.json"),
            lambda handle: json.dump(summary, handle, indent=2),
        )
    return summary
