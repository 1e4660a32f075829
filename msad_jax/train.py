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
with the same parameters as an uninterrupted run. A NaN loss stops the run with
:class:`TrainingDivergedError` before anything NaN is checkpointed.

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

from msad_jax import distributed, evaluation, plots, reporting
from msad_jax.checkpointing import CheckpointError, RunCheckpoints
from msad_jax.config import ConfigError, validate_config
from msad_jax.data import augment, pipeline, protocols, subsets, synthetic, transforms
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
from msad_jax.train_step import TrainState, make_train_step, pmap_train_step, replicate_state

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
)
DETECTOR_FILE = "detector.npz"
RUN_INFO_FILE = "run.json"


class TrainingDivergedError(UserError, RuntimeError):
    """The training loss became NaN or infinite."""


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


def compute_dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
    """The model's compute dtype."""
    return jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32


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


def _check_resume_config(saved: dict[str, Any], config: ml_collections.ConfigDict) -> None:
    changed = [k for k in RESUME_KEYS if k in saved and saved[k] != config[k]]
    if changed:
        details = ", ".join(f"{k}: {saved[k]!r} -> {config[k]!r}" for k in changed)
        raise CheckpointError(
            f"The workdir holds a run with a different config ({details}); use a new --workdir "
            "or the original settings."
        )


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
    model: Any
    extractor: Any
    step_fn: Any
    steps_per_epoch: int
    total_steps: int
    writer: MetricWriter
    checkpoints: RunCheckpoints

    def evaluate(self, state: TrainState, *, center: bool = False) -> evaluation.Evaluation:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
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


def _check_finite(records: Sequence[tuple[int, dict[str, float]]], run: _Run) -> None:
    for step, values in records:
        if not math.isfinite(values["loss"]):
            last = run.checkpoints.latest_step()
            raise TrainingDivergedError(
                f"The training loss became {values['loss']} at step {step}; stopped without "
                f"saving it. The last good checkpoint (step {last}) is in "
                f"{run.checkpoints.directory}. Lower config.learning_rate or use float32."
            )


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
                _host_state(state, center),
                {
                    **progress,
                    "epoch": epoch,
                    "step_in_epoch": done_in_epoch,
                    "epoch_losses": losses,
                },
            )
    flush()
    return state, losses


def _write_outputs(run: _Run, final: evaluation.Evaluation, history: list[dict[str, Any]]) -> dict:
    """Report, plots and detector file of a finished class (written by process 0 only)."""
    config, data = run.config, run.data
    train_scores = evaluation.leave_one_out_scores(
        final.gallery, config.knn_k, memory_budget_bytes=config.knn_memory_budget_mb * 2**20
    )
    threshold = float(np.quantile(train_scores, config.threshold_quantile))
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
        "threshold_quantile": config.threshold_quantile,
    }
    if not distributed.is_main_process():
        return report  # every process has the same report; process 0 writes it
    np.savez(
        os.path.join(run.workdir, DETECTOR_FILE),
        gallery=final.gallery,
        train_scores=train_scores,
        test_scores=final.scores,
        test_labels=final.labels,
        threshold=np.asarray(threshold),
        image_side=np.asarray(data.train_images.shape[1]),
    )
    with open(os.path.join(run.workdir, "report.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    with open(os.path.join(run.workdir, "report.md"), "w", encoding="utf-8") as handle:
        handle.write(_class_markdown(report))
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
    lines += [
        "",
        f"Threshold ({report['threshold_quantile']} quantile of leave-one-out training "
        f"scores): {report['threshold']:.6g}.",
        "",
    ]
    return "\n".join(lines)


def train_one_class(
    config: ml_collections.ConfigDict, workdir: str, normal_class: int
) -> dict[str, Any]:
    """Trains and evaluates with one normal class; resumes from ``workdir`` when possible.

    Returns:
      The report (also written to ``<workdir>/report.json``).
    """
    os.makedirs(workdir, exist_ok=True)
    data = load_data(config, normal_class)
    logger.info("%s", data.summary())
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
    run = _Run(
        config=config,
        workdir=workdir,
        data=data,
        model=model,
        extractor=make_feature_extractor(model, transforms.make_preprocess_fn(prep)),
        step_fn=pmap_train_step(step),
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        writer=MetricWriter(workdir) if distributed.is_main_process() else _NullWriter(),
        checkpoints=RunCheckpoints(
            os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints
        ),
    )
    if distributed.is_main_process():
        with open(os.path.join(workdir, RUN_INFO_FILE), "w", encoding="utf-8") as handle:
            json.dump(
                {"config": config.to_dict(), "preprocessing": dataclasses.asdict(prep)},
                handle,
                indent=2,
            )
    try:
        return _train_and_report(run, variables, tx)
    finally:
        run.checkpoints.close()
        run.writer.close()


def _train_and_report(run: _Run, variables: dict[str, PyTree], tx: Any) -> dict[str, Any]:
    config = run.config
    fresh = TrainState(
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(variables["params"]),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key(config.seed),
    )
    template = {
        "params": fresh.params,
        "batch_stats": fresh.batch_stats,
        "opt_state": fresh.opt_state,
        "step": np.zeros((), np.int32),
        "rng": np.asarray(jax.random.key_data(fresh.rng)),
        "center": np.zeros((run.model.feature_dim,), np.float32),
    }
    latest = run.checkpoints.latest_step()
    if latest is not None:
        host, progress = run.checkpoints.restore(template)
        _check_resume_config(progress["config"], config)
        logger.info("Resuming from step %d (epoch %d).", latest, progress["epoch"])
        state = replicate_state(_train_state(host))
        center_host = host["center"]
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
        }
        run.checkpoints.save(0, _host_state(state, center_host), progress)
        if run.total_steps == 0:
            return _write_outputs(run, result, progress["history"])
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
            run.checkpoints.save(steps_done, _host_state(state, center_host), progress)
    if final is None:  # resumed after the last epoch finished, or no training steps
        final = run.evaluate(state)
    return _write_outputs(run, final, history)


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
    classes = normal_classes(config)
    if str(config.normal_class) != "all":
        return train_one_class(config, workdir, classes[0])
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
        with open(os.path.join(workdir, "report.json"), "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2)
    return summary
