"""The main job: fine-tune with MSC on one normal class (or each in turn) and evaluate.

:func:`train_and_evaluate` is what ``python -m msad_jax.main`` runs and what notebooks call. For
one normal class it does, in order (SPEC §3-7):

1. load the one-class data and the backbone with its pretrained weights;
2. evaluate at epoch 0 (kNN on the pretrained features) and compute the center from the same pass;
3. train for ``config.epochs`` epochs with the pmapped MSC step, evaluating after every
   ``config.eval_every_epochs`` epochs (logged only: nothing is selected on test data) and always
   after the last one;
4. write the report (JSON + Markdown), plots, and what :class:`msad_jax.detector.Detector` needs
   (:mod:`msad_jax.run_outputs`).

Checkpoints are written every ``config.checkpoint_every_steps`` steps and after every epoch; a run
started again in the same ``workdir`` resumes from the newest one (parameters, optimizer state,
step, PRNG key, center, position in the epoch's data order and the evaluation history) and ends
with the same parameters as an uninterrupted run. A damaged checkpoint (see
:mod:`msad_jax.checkpointing`) is reported in one line, moved to ``<workdir>/damaged_checkpoints/``
and the run resumes from the newest intact one. A NaN loss, or parameters that give NaN features,
stop the run with :class:`TrainingDivergedError` before anything NaN is checkpointed.

A workdir belongs to one run: its lock (:mod:`msad_jax.workdir`) keeps a second run out while one
is running, and a run started again must agree with the first on everything that defines the
result (:func:`msad_jax.run_setup.run_identity`: the recipe, the data source with a
fingerprint of a folder's files, the image size, the subsets); otherwise it stops with one line
before writing anything. It may ask for more epochs: ``detector.npz`` and the reports always
describe one checkpoint (its step is recorded, and that checkpoint is kept until they are
rewritten).

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

from msad_jax import distributed, evaluation, run_outputs, run_state
from msad_jax.checkpointing import (
    CheckpointError,
    RunCheckpoints,
    non_finite_items,
)
from msad_jax.config import ConfigError, validate_config
from msad_jax.data import augment, pil_augment, pil_eval, pipeline, transforms
from msad_jax.data.protocols import OneClassData
from msad_jax.errors import UserError
from msad_jax.features import make_feature_extractor
from msad_jax.metric_writer import MetricWriter
from msad_jax.optimizer import make_optimizer
from msad_jax.run_files import (
    DETECTOR_FILE,
    recorded_detector_step,
)
from msad_jax.run_setup import (
    check_enough_images,
    class_names,
    frozen_patterns,
    load_data,
    model_and_variables,
    normal_classes,
    preprocessing_for,
    run_identity,
    split_holdout,
    training_steps,
)
from msad_jax.train_step import (
    TrainState,
    create_train_state,
    make_train_step,
    pmap_train_step,
    replicate_state,
)
from msad_jax.workdir import WorkdirBusyError, WorkdirLock, check_workdir_path

__all__ = [
    "DETECTOR_FILE",
    "CheckpointError",
    "TrainingDivergedError",
    "class_names",
    "frozen_patterns",
    "load_data",
    "model_and_variables",
    "normal_classes",
    "preprocessing_for",
    "run_identity",
    "split_holdout",
    "train_and_evaluate",
    "train_one_class",
    "training_steps",
]

PyTree = Any
logger = logging.getLogger(__name__)


class TrainingDivergedError(UserError, RuntimeError):
    """The training loss, or the model's features, became NaN or infinite."""


class _NullWriter:
    """Stands in for :class:`MetricWriter` on processes other than 0 (they write nothing)."""

    def write(self, record: Any, *, step: int, prefix: str = "") -> None:
        del record, step, prefix

    def close(self) -> None:
        pass


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
    data: OneClassData
    eval_data: OneClassData  # data as the extractor takes it (eval_resize)
    holdout_images: np.ndarray  # normal training images held out for calibration (may be empty)
    model: Any
    extractor: Any
    step_fn: Any
    prep: transforms.Preprocessing
    steps_per_epoch: int
    total_steps: int
    writer: MetricWriter | _NullWriter
    checkpoints: RunCheckpoints

    def evaluate(self, state: TrainState, *, center: bool = False) -> evaluation.Evaluation:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        try:
            return evaluation.evaluate(
                self.extractor,
                variables,
                self.eval_data,
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
    """:func:`msad_jax.run_state.host_state`, refusing parameters that are no longer finite."""
    host = run_state.host_state(state, center)
    if non_finite_items(host):
        raise _diverged(run, f"The parameters became NaN or infinite by step {int(host['step'])}")
    return host


def _epoch_batches(run: _Run, epoch: int, start: int) -> Iterator[dict[str, jax.Array]]:
    batches: Iterator[dict[str, np.ndarray]] = pipeline.train_batches(
        run.data.train_images,
        global_batch_size=run.config.batch_size,
        num_devices=jax.local_device_count(),
        seed=run.config.seed,
        epoch=epoch,
        start_step=start,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    if run.config.augment == "pil":
        batches = pil_augment.host_view_batches(
            batches,
            size=run.prep.size,
            seed=run.config.seed,
            workers=run.config.augment_workers,
            first_step=epoch * run.steps_per_epoch + start,
            process_index=jax.process_index(),
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
) -> tuple[TrainState, list[float], list[float]]:
    """Runs one epoch's steps from ``start``; returns the state, step losses and batch sizes."""
    config = run.config
    pending = _PendingMetrics()
    losses: list[float] = list(progress.get("epoch_losses", []))
    # Checkpoints of earlier versions kept no counts: their steps were full batches.
    counts: list[float] = list(progress.get("epoch_counts", [])) or [config.batch_size] * len(
        losses
    )
    global_step = epoch * run.steps_per_epoch + start

    def flush() -> None:
        records = pending.drain()
        _check_finite(records, run)
        for step, values in records:
            losses.append(values["loss"])
            counts.append(values.pop("count"))
            run.writer.write({"step": step, "epoch": epoch, **values}, step=step, prefix="train/")
        if records:
            bar.set_postfix(loss=f"{records[-1][1]['loss']:.4f}", epoch=epoch)

    for offset, batch in enumerate(_epoch_batches(run, epoch, start)):
        if global_step >= run.total_steps:
            break
        state, metrics = run.step_fn(state, batch, center)
        global_step += 1
        pending.add(
            global_step, {k: metrics[k] for k in ("loss", "align", "uniform", "angular", "count")}
        )
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
                    "epoch_counts": counts,
                },
            )
    flush()
    return state, losses, counts


def _write_outputs(
    run: _Run,
    final: evaluation.Evaluation,
    history: list[dict[str, Any]],
    step: int,
    state: TrainState,
) -> dict[str, Any]:
    """Sets the threshold and writes the class's outputs (:mod:`msad_jax.run_outputs`).

    ``step`` is the checkpoint whose parameters gave ``final`` (``state``, replicated); it is on
    disk before the detector file names it. Every process returns the same report; process 0
    writes.
    """
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    holdout = None
    if len(run.holdout_images):
        holdout = evaluation.features_of(
            run.extractor, variables, run.holdout_images, batch_size=run.config.eval_batch_size
        )
        try:
            evaluation.check_finite_features(holdout, "held-out normal training images")
        except evaluation.NonFiniteFeaturesError as err:
            raise _diverged(run, f"The model's features became NaN ({err})") from err
    threshold = run_outputs.set_threshold(run.config, final.gallery, holdout)
    report = run_outputs.class_report(run.config, run.data, final, history, step, threshold)
    run.checkpoints.wait()
    if distributed.is_main_process():
        host_variables = jax.device_get(jax.tree.map(lambda x: x[0], variables))
        run_outputs.write_class_outputs(
            run.workdir, run.config, run.data, final, report, threshold, host_variables
        )
    return report


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
    run_state.check_run_info(workdir, identity)
    data, holdout_images = split_holdout(config, load_data(config, normal_class))
    logger.info("%s", data.summary())
    if len(holdout_images):
        logger.info(
            "%d normal training images held out to calibrate the threshold.", len(holdout_images)
        )
    check_enough_images(config, data, len(holdout_images))
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
        augment_fn=augment.make_augment_fn(prep) if config.augment == "device" else None,
        frozen=frozen,
    )
    if config.augment == "pil":
        step = pil_augment.with_normalized_views(step, prep)
    steps_per_epoch, total_steps = training_steps(config, len(data.train_images))
    fresh = create_train_state(variables, tx, jax.random.key(config.seed))
    detector_step = recorded_detector_step(workdir)
    checkpoints = RunCheckpoints(
        os.path.join(workdir, "checkpoints"),
        max_to_keep=config.keep_checkpoints,
        keep_steps=() if detector_step is None else (detector_step,),
    )
    writer: MetricWriter | _NullWriter = _NullWriter()
    eval_data, eval_holdout, preprocess_fn = pil_eval.eval_inputs(
        config.eval_resize, data, holdout_images, prep
    )
    try:
        resumed = run_state.restore_newest_intact(
            checkpoints, run_state.host_tree(fresh, np.zeros(model.feature_dim)), identity, workdir
        )
        if distributed.is_main_process():
            resume_step = None if resumed is None else int(resumed[0]["step"])
            writer = MetricWriter(workdir, resume_step=resume_step)
            run_state.write_run_info(workdir, config, prep, identity)
        run = _Run(
            config=config,
            workdir=workdir,
            data=data,
            eval_data=eval_data,
            holdout_images=eval_holdout,
            model=model,
            extractor=make_feature_extractor(model, preprocess_fn),
            step_fn=pmap_train_step(step),
            prep=prep,
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
        state = replicate_state(run_state.train_state(host))
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
            state, losses, counts = _train_epoch(run, state, center, epoch, start, progress, bar)
            seconds = time.perf_counter() - t0
            steps_done = int(jax.device_get(state.step[0]))
            last = steps_done >= run.total_steps
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "step": steps_done,
                "mean_loss": pipeline.epoch_mean_loss(losses, counts) if losses else None,
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
                "epoch_counts": [],
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
    summary = run_outputs.dataset_summary(config, reports)
    if distributed.is_main_process():
        run_outputs.write_dataset_outputs(workdir, config, summary)
    return summary
