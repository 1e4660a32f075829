"""The conditioning study: contrastive loss and MSC side by side from one pretrained start.

For one normal class, each loss starts from the same weights, key and data order; at epoch 0 and
after every epoch it records kNN ROC-AUC and AP, compactness around the pretrained center,
uniformity of phi and theta, and on a fixed probe batch: the loss split, the gradient balance
(w.r.t. features and parameters), the radial drift of one SGD step and the tangent Hessian
spectrum. ``conditioning.json`` is rewritten after every epoch; ``.md`` and ``.png`` at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from msad_jax import evaluation
from msad_jax.analysis import study_report
from msad_jax.analysis.conditioning import (
    _feature_gradients,
    _parameter_gradients,
    _positive_cosine,
    compactness,
    gradient_balance,
    loss_shift,
    radial_drift,
    uniformity,
    update_direction,
)
from msad_jax.analysis.hessian import hessian_spectrum
from msad_jax.analysis.study_config import run_config, study_losses, validate_study_config
from msad_jax.data import augment, pipeline, transforms
from msad_jax.data.protocols import OneClassData
from msad_jax.features import make_feature_extractor
from msad_jax.losses import mean_shift
from msad_jax.optimizer import make_optimizer
from msad_jax.run_setup import (
    frozen_patterns,
    load_data,
    model_and_variables,
    normal_classes,
    preprocessing_for,
    training_steps,
)
from msad_jax.train_step import create_train_state, example_keys, make_train_step, replicate_state

PyTree = Any
logger = logging.getLogger(__name__)

RESULTS_JSON = "conditioning.json"
RESULTS_MD = "conditioning.md"
RESULTS_PNG = "conditioning.png"

# Fold-in constant separating the probe's augmentation keys from the training steps' keys.
_PROBE_STREAM = 0x5EED


@dataclasses.dataclass(frozen=True)
class Probe:
    """The fixed batch on which gradients, drift and curvature are measured.

    Attributes:
      indices: rows of the training images used.
      views1: ``[P, S, S, 3]`` first augmented views (fixed once).
      views2: ``[P, S, S, 3]`` second views.
      eval_images: ``[P, S, S, 3]`` evaluation-transform images (for compactness and drift).
    """

    indices: np.ndarray
    views1: jax.Array
    views2: jax.Array
    eval_images: jax.Array


def make_probe(images: np.ndarray, prep: transforms.Preprocessing, size: int, seed: int) -> Probe:
    """Draws the probe: ``size`` training images and two fixed augmented views of each.

    Args:
      images: uint8 ``[N, H, W, 3]`` normal training images.
      prep: the preprocessing (augmentation output size and normalisation).
      size: number of probe images (at most ``N``).
      seed: seed of the choice of images and of the augmentations.
    """
    if size > len(images):
        raise ValueError(
            f"probe_size={size} exceeds the {len(images)} training images; lower config.probe_size."
        )
    indices = np.sort(np.random.default_rng([seed, 2]).choice(len(images), size, replace=False))
    chosen = jnp.asarray(images[indices])
    key = jax.random.fold_in(jax.random.key(seed), _PROBE_STREAM)
    rows = jnp.arange(size)
    augment_fn = jax.jit(augment.make_augment_fn(prep))
    views = [
        augment_fn(example_keys(key, jnp.zeros((), jnp.int32), v, rows), chosen) for v in (0, 1)
    ]
    eval_images = jax.jit(transforms.make_preprocess_fn(prep))(chosen)
    return Probe(indices=indices, views1=views[0], views2=views[1], eval_images=eval_images)


@functools.lru_cache(maxsize=16)
def make_probe_fn(
    model: Any,
    *,
    temperature: float,
    learning_rate: float,
    weight_decay: float,
    frozen: tuple[str, ...],
) -> Callable[..., dict[str, jax.Array]]:
    """Jitted ``(variables, views1, views2, eval_images, center, shift) -> measurements``."""

    @jax.jit
    def fn(variables, views1, views2, eval_images, center, shift):
        b = views1.shape[0]
        grads = _parameter_gradients(
            model,
            variables,
            views1,
            views2,
            center,
            shift,
            temperature=temperature,
            frozen=frozen,
        )
        feats = grads.features
        on_features = gradient_balance(
            *_feature_gradients(feats[:b], feats[b:], center, shift, temperature=temperature)
        )
        on_params = gradient_balance(grads.align, grads.uniform)
        total = jax.tree_util.tree_map(jnp.add, grads.align, grads.uniform)
        direction = update_direction(
            total,
            variables["params"],
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            frozen=frozen,
        )
        probe_compactness, drift = radial_drift(model, variables, eval_images, center, direction)
        out = {
            "probe_align": grads.split.align,
            "probe_uniform": grads.split.uniform,
            "probe_loss": grads.split.total,
            "positive_cos": _positive_cosine(feats[:b], feats[b:], center, shift),
            "positive_cos_phi": _positive_cosine(feats[:b], feats[b:], None, 0.0),
            "probe_compactness": probe_compactness,
            "radial_drift": drift,
            "features": feats,
        }
        for prefix, balance in (("feat", on_features), ("param", on_params)):
            out.update({f"{prefix}_{k}": v for k, v in balance._asdict().items()})
        return out

    return fn


def geometry(gallery: np.ndarray, center: np.ndarray, samples: int, seed: int) -> dict[str, float]:
    """Compactness, center norm and uniformity (phi and theta) of the gallery features."""
    phi = jnp.asarray(gallery)
    center_j = jnp.asarray(center)
    rows = np.arange(len(gallery))
    if len(rows) > samples:
        rows = np.sort(np.random.default_rng([seed, 3]).choice(len(rows), samples, replace=False))
    subset = phi[rows]
    return {
        "compactness": float(compactness(phi, center_j)),
        "center_norm": float(jnp.linalg.norm(jnp.mean(phi, axis=0))),
        "uniformity_phi": float(uniformity(subset)),
        "uniformity_theta": float(uniformity(mean_shift(subset, center_j))),
    }


def measure(
    probe_fn: Callable[..., dict[str, jax.Array]],
    variables: PyTree,
    probe: Probe,
    center: np.ndarray,
    *,
    loss: str,
    temperature: float,
    hessian_size: int,
    hessian_top: int,
) -> dict[str, Any]:
    """Probe measurements of one model for one loss (what the module docstring lists)."""
    out = jax.device_get(
        probe_fn(
            variables,
            probe.views1,
            probe.views2,
            probe.eval_images,
            jnp.asarray(center),
            loss_shift(loss, center),
        )
    )
    feats = out.pop("features")
    record = {k: float(v) for k, v in out.items()}
    p = probe.views1.shape[0]
    spectrum = hessian_spectrum(
        jnp.asarray(feats[:hessian_size]),
        jnp.asarray(feats[p : p + hessian_size]),
        jnp.asarray(center),
        loss=loss,
        temperature=temperature,
    )
    summary = spectrum.summary(top=hessian_top)
    record.update(
        {
            "hessian_top": summary["top_eigenvalues"],
            "hessian_min": summary["min_eigenvalue"],
            "hessian_condition": summary["condition_number"],
            "hessian_negative": summary["num_negative"],
            "hessian_null": summary["num_null"],
            "hessian_dim": summary["dimension"],
        }
    )
    return record


@dataclasses.dataclass
class _Setup:
    config: ml_collections.ConfigDict
    data: OneClassData
    model: Any
    variables: PyTree
    prep: transforms.Preprocessing
    frozen: tuple[str, ...]
    extractor: Any
    center: np.ndarray
    probe: Probe
    steps_per_epoch: int
    total_steps: int


def _evaluate(setup: _Setup, variables: PyTree, *, center: bool = False) -> evaluation.Evaluation:
    config = setup.config
    return evaluation.evaluate(
        setup.extractor,
        replicate_state({k: variables[k] for k in ("params", "batch_stats") if k in variables}),
        setup.data,
        k=config.knn_k,
        batch_size=config.eval_batch_size,
        memory_budget_bytes=config.knn_memory_budget_mb * 2**20,
        center=center,
        normalize_center=False,
    )


def _record(
    setup: _Setup,
    loss: str,
    probe_fn: Callable[..., dict[str, jax.Array]],
    variables: PyTree,
    result: evaluation.Evaluation,
    epoch: int,
    step: int,
) -> dict[str, Any]:
    config = setup.config
    t0 = time.perf_counter()
    record: dict[str, Any] = {"epoch": epoch, "step": step}
    record.update({k: float(v) for k, v in result.metrics.items()})
    record.update(geometry(result.gallery, setup.center, config.uniformity_samples, config.seed))
    record.update(
        measure(
            probe_fn,
            variables,
            setup.probe,
            setup.center,
            loss=loss,
            temperature=config.temperature,
            hessian_size=config.hessian_size,
            hessian_top=config.hessian_top,
        )
    )
    record["radial_drift_epoch"] = record["radial_drift"] * setup.steps_per_epoch
    record["measure_seconds"] = time.perf_counter() - t0
    return record


def _write(workdir: str, results: dict[str, Any]) -> None:
    path = os.path.join(workdir, RESULTS_JSON)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    os.replace(path + ".tmp", path)


def _setup(config: ml_collections.ConfigDict) -> tuple[_Setup, evaluation.Evaluation]:
    base = run_config(config)
    normal_class = normal_classes(base)[0]
    data = load_data(base, normal_class)
    logger.info("%s", data.summary())
    model, variables, spec = model_and_variables(base)
    prep = preprocessing_for(base, spec)
    frozen = frozen_patterns(base, spec)
    extractor = make_feature_extractor(model, transforms.make_preprocess_fn(prep))
    steps_per_epoch, total_steps = training_steps(config, len(data.train_images))
    setup = _Setup(
        config=config,
        data=data,
        model=model,
        variables=variables,
        prep=prep,
        frozen=frozen,
        extractor=extractor,
        center=np.zeros(()),
        probe=make_probe(data.train_images, prep, config.probe_size, config.seed),
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
    )
    t0 = time.perf_counter()
    initial = _evaluate(setup, variables, center=True)
    logger.info(
        "epoch 0 (pretrained): ROC-AUC %.2f%% (%.0f s)",
        100 * initial.metrics["auroc"],
        time.perf_counter() - t0,
    )
    return dataclasses.replace(setup, center=initial.center), initial


def _train_epoch(
    setup: _Setup, step_fn: Callable, state: Any, epoch: int, bar: tqdm.tqdm
) -> tuple[Any, dict[str, float]]:
    config = setup.config
    sums = {"loss": 0.0, "align": 0.0, "uniform": 0.0}
    count = 0
    center = jnp.asarray(setup.center)
    pending = []
    batches = pipeline.train_batches(
        setup.data.train_images,
        global_batch_size=config.batch_size,
        num_devices=1,
        seed=config.seed,
        epoch=epoch,
    )
    for offset, batch in enumerate(batches):
        if epoch * setup.steps_per_epoch + offset >= setup.total_steps:
            break
        state, metrics = step_fn(state, {k: jnp.asarray(v[0]) for k, v in batch.items()}, center)
        pending.append({k: metrics[k] for k in sums})
        bar.update(1)
    for values in jax.device_get(pending):
        for key in sums:
            sums[key] += float(values[key])
        count += 1
    means = {f"train_{k}": (v / count if count else None) for k, v in sums.items()}
    if count and not np.isfinite(means["train_loss"]):
        raise RuntimeError(
            f"The training loss became {means['train_loss']} in epoch {epoch + 1}; lower "
            "config.learning_rate."
        )
    return state, means


def run_study(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs the study (module docstring) and writes its table, JSON and plots into ``workdir``.

    Args:
      config: a study configuration (:func:`msad_jax.analysis.study_config.study_config`).
      workdir: output folder (created; earlier results there are overwritten).

    Returns:
      The results dict also written to ``<workdir>/conditioning.json``: ``config``,
      ``preprocessing``, ``counts``, ``center_norm``, ``steps_per_epoch``, and ``runs`` mapping
      each loss to its list of per-epoch records (epoch 0 first).
    """
    validate_study_config(config)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    start = time.perf_counter()
    setup, initial = _setup(config)
    losses = study_losses(config)
    results: dict[str, Any] = {
        "config": config.to_dict(),
        "dataset": setup.data.name,
        "normal_class": setup.data.normal_class,
        "class_name": setup.data.normal_class_name,
        "preprocessing": {**dataclasses.asdict(setup.prep), "size": setup.prep.size},
        "frozen": list(setup.frozen),
        "counts": setup.data.counts(),
        "center_norm": float(np.linalg.norm(setup.center)),
        "steps_per_epoch": setup.steps_per_epoch,
        "runs": {loss: [] for loss in losses},
        "seconds": {},
    }
    augment_fn = augment.make_augment_fn(setup.prep)
    runs = {}
    for loss in losses:
        tx = make_optimizer(
            setup.variables["params"],
            learning_rate=config.learning_rate,
            weight_decay=config.weight_decay,
            frozen=setup.frozen,
        )
        step = make_train_step(
            setup.model,
            tx,
            loss=loss,
            temperature=config.temperature,
            augment_fn=augment_fn,
            frozen=setup.frozen,
            axis_name=None,
        )
        probe_fn = make_probe_fn(
            setup.model,
            temperature=config.temperature,
            learning_rate=config.learning_rate,
            weight_decay=config.weight_decay,
            frozen=tuple(setup.frozen),
        )
        state = create_train_state(setup.variables, tx, jax.random.key(config.seed))
        runs[loss] = (jax.jit(step), probe_fn, state)
        record = _record(setup, loss, probe_fn, setup.variables, initial, 0, 0)
        results["runs"][loss].append(record)
        logger.info("%s", study_report.log_line(loss, record))
    _write(workdir, results)
    epochs = -(-setup.total_steps // setup.steps_per_epoch) if setup.total_steps else 0
    with tqdm.tqdm(
        total=setup.total_steps * len(losses),
        desc="training",
        unit="step",
        disable=not config.progress,
    ) as bar:
        for epoch in range(epochs):
            for loss in losses:
                step_fn, probe_fn, state = runs[loss]
                t0 = time.perf_counter()
                state, train_means = _train_epoch(setup, step_fn, state, epoch, bar)
                train_seconds = time.perf_counter() - t0
                runs[loss] = (step_fn, probe_fn, state)
                variables = {"params": state.params, "batch_stats": state.batch_stats}
                t0 = time.perf_counter()
                result = _evaluate(setup, variables)
                eval_seconds = time.perf_counter() - t0
                record = _record(
                    setup, loss, probe_fn, variables, result, epoch + 1, int(state.step)
                )
                record.update(train_means)
                record.update({"train_seconds": train_seconds, "eval_seconds": eval_seconds})
                results["runs"][loss].append(record)
                logger.info("%s", study_report.log_line(loss, record))
            results["seconds"]["total"] = time.perf_counter() - start
            _write(workdir, results)
    results["seconds"]["total"] = time.perf_counter() - start
    _write(workdir, results)
    with open(os.path.join(workdir, RESULTS_MD), "w", encoding="utf-8") as handle:
        handle.write(study_report.markdown(results))
    if config.plots:
        study_report.plot(results, os.path.join(workdir, RESULTS_PNG))
    return results


__all__ = [
    "Probe",
    "geometry",
    "make_probe",
    "make_probe_fn",
    "measure",
    "run_study",
]
