"""Benchmark: pretrained kNN vs MSC vs standard contrastive on the exact CIFAR-10 pixels, 224 px.

The data are the original CIFAR-10 pixels of ``lossless_reference_subsets.npz`` (see
``../shared/data/README.md``; per class its ~400 training images among the official first 4000,
and all of the first 1000 test images), written losslessly as PNG files into
``<workdir>/cifar10_exact_png.zip`` (``exact_cifar.py``) and read by the product's folder loader
at their native 32 px (``image_size=32``); every run checks that the loaded arrays equal the npz
file's bit for bit. The model is EfficientNet-Lite0 at its native 224 px with its ImageNet weights;
the settings are ``configs/cifar10_exact_efficientnet_lite0.py`` (its docstring gives the reasons).

Each run is one (backbone, class, method, learning rate, seed, implementation):

* ``jax``: the product path, :func:`msad_jax.train.train_and_evaluate`, in its own workdir
  ``<workdir>/<name>/``; an interrupted run resumes from its checkpoints there;
* ``torch``: the PyTorch reference (``torch_reference.py``: the ``efficientnet-lite-pytorch``
  package's model with the same weights, the same frozen parameters, loss and SGD) trained on
  exactly the views the JAX run used: the same training images in the same batch order
  (``msad_jax.data.pipeline.train_batches``) and the views regenerated on the host with the same
  augmentation function and the same per-example keys (``msad_jax.train_step.example_keys``), see
  :func:`make_views_fn`; evaluated on the same evaluation tensors (``eval_transform``) with its own
  kNN (torch) and ROC-AUC (scikit-learn); resumes from its last finished epoch.

A JAX run's training views are made on the device (``augment='device'``, the default) or, for the
runs named ``..._pil``, with Pillow on the host as torchvision makes them (``augment='pil'``,
``msad_jax.data.pil_augment``); the evaluation transform is the same for both.

Epoch 0 (before any update) is the pretrained kNN. A finished run writes one JSON record to
``<records>/<name>.json`` (ROC-AUC and AP after every epoch, losses, config, preprocessing, timings,
git commit, package versions, machine and load); runs with a record are skipped, and a record is
never replaced by a run with other settings (``run_records.py``). Every run runs in a child process
(memory is returned between runs, a failed run does not stop the grid). After each record the
Markdown report is regenerated (``cifar10_exact_report.py``; the README section only when that
script is run by hand).

Pilot (``--pilot_lrs 1e-3,3e-3``): class 0, MSC, seed 0 for ``--pilot_epochs`` epochs at each
rate, records in ``<results>/pilot/``, in the workdirs the grid uses (a grid run at a piloted rate
resumes from there).

The grid, in the order it runs (most informative first): classes 0, 3, 8 at ``--lr`` (MSC and
standard contrastive, seed 0); the PyTorch reference of those six runs; the published lr
``--published_lr`` on classes 0, 3, 8; the other seven classes at ``--lr``; seed 1 on 0, 3, 8;
then the training-view comparison: MSC at ``--lr`` on classes 0, 3, 8 with seeds 0, 1, 2 and
Pillow views, and with device views the seed these lack (2), ordered by seed so that every
finished seed gives complete (class, seed) pairs.

Usage (repository root; restartable: the same command resumes where it stopped)::

    nohup nice -n 10 python benchmarks/cifar10_exact.py > runs/cifar10_exact.log 2>&1 &
    python benchmarks/cifar10_exact.py --dry_run      # the grid and what is finished
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The repository's own msad_jax, also for the child processes, whatever is installed.
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import exact_cifar  # noqa: E402
import run_records  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "cifar10_exact_efficientnet_lite0.py"
DEFAULT_WORKDIR = REPO / "runs" / "cifar10_exact"
DEFAULT_RESULTS = REPO / "benchmarks" / "results" / "cifar10_exact"
ZIP_NAME = "cifar10_exact_png.zip"
METHODS = ("msc", "contrastive")
IMPLEMENTATIONS = ("jax", "torch")
AUGMENTS = ("device", "pil")  # config.augment: where the training views are made
FIRST_CLASSES = (0, 3, 8)
PIPELINE_SEEDS = (0, 1, 2)  # seeds of the device-vs-Pillow views comparison (MSC, classes 0, 3, 8)
# Config keys that, with the run's identity, define what a record means.
SETTING_KEYS = (
    "image_size",
    "pretrained",
    "frozen",
    "dtype",
    "resize",
    "crop",
    "resize_method",
    "angular",
    "temperature",
    "weight_decay",
    "batch_size",
    "epochs",
    "max_steps",
    "knn_k",
    "train_images",
    "test_images",
)
# Settings newer than the first records, with the value those records were made with: a setting
# enters a record's identity only when it differs from that value, so earlier records still match.
LATER_SETTINGS = {"augment": "device", "eval_resize": "float"}


# --------------------------------------------------------------------------------------------
# The grid.


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of the grid."""

    backbone: str
    normal_class: int
    method: str
    learning_rate: float
    seed: int
    implementation: str
    augment: str = "device"

    @property
    def name(self) -> str:
        """File and folder name, e.g. ``lite0_c3_msc_lr1e-03_s0_jax`` (``_pil`` added: Pillow)."""
        short = self.backbone.removeprefix("efficientnet_")
        suffix = "" if self.augment == "device" else f"_{self.augment}"
        return (
            f"{short}_c{self.normal_class}_{self.method}_lr{self.learning_rate:.0e}_"
            f"s{self.seed}_{self.implementation}{suffix}"
        )


def build_grid(
    *,
    backbone: str,
    lr: float,
    published_lr: float,
    first_classes: Sequence[int] = FIRST_CLASSES,
    num_classes: int = 10,
    seeds: Sequence[int] = (0, 1),
    methods: Sequence[str] = METHODS,
    pipeline_seeds: Sequence[int] = PIPELINE_SEEDS,
) -> list[RunSpec]:
    """The runs in the order they run (see the module docstring)."""

    def runs(classes, rate, seed, implementation):
        return [
            RunSpec(backbone, c, m, rate, seed, implementation) for c in classes for m in methods
        ]

    rest = [c for c in range(num_classes) if c not in first_classes]
    first_seed, *other_seeds = seeds
    grid = runs(first_classes, lr, first_seed, "jax")
    grid += runs(first_classes, lr, first_seed, "torch")
    grid += runs(first_classes, published_lr, first_seed, "jax")
    grid += runs(rest, lr, first_seed, "jax")
    for seed in other_seeds:
        grid += runs(first_classes, lr, seed, "jax")
    names = {spec.name for spec in grid}
    for seed in pipeline_seeds:
        for c in first_classes:
            for augment in AUGMENTS:
                spec = RunSpec(backbone, c, "msc", lr, seed, "jax", augment)
                if spec.name not in names:
                    grid.append(spec)
                    names.add(spec.name)
    return grid


def find_run(grid: Sequence[RunSpec], name: str) -> RunSpec:
    """The run of ``grid`` called ``name``."""
    for spec in grid:
        if spec.name == name:
            return spec
    raise SystemExit(f"error: no run {name!r} in the grid; see --dry_run for the names.")


# --------------------------------------------------------------------------------------------
# Configuration.


def load_config(path: pathlib.Path):
    """``get_config()`` of a config file."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None or not path.is_file():
        raise SystemExit(f"error: config file {path} not found; pass --config configs/<name>.py.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def apply_overrides(config, overrides: Sequence[str]) -> None:
    """:func:`run_records.apply_overrides`, its errors as one ``error:`` line."""
    try:
        run_records.apply_overrides(config, overrides)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


def run_config(base, spec: RunSpec, data_zip: pathlib.Path):
    """The product config of one run."""
    import ml_collections

    config = ml_collections.ConfigDict(base.to_dict())
    config.dataset = "folder"
    config.data_dir = str(data_zip)
    config.backbone = spec.backbone
    config.normal_class = str(spec.normal_class)
    config.loss = spec.method
    config.learning_rate = spec.learning_rate
    config.seed = spec.seed
    config.augment = spec.augment
    config.progress = False
    return config


def identity(spec: RunSpec, config, data_sha256: str) -> dict[str, Any]:
    """What a record must agree on to count as this run's result (see ``LATER_SETTINGS``)."""
    ident = {
        **dataclasses.asdict(spec),
        **{key: config[key] for key in SETTING_KEYS},
        **{key: config[key] for key in LATER_SETTINGS},
        "data_sha256": data_sha256,
    }
    return {k: v for k, v in ident.items() if k not in LATER_SETTINGS or v != LATER_SETTINGS[k]}


def relative(path: str | os.PathLike) -> str:
    """A path relative to the repository root when it lies inside it."""
    path = pathlib.Path(path).resolve()
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return path.name


def plain_config(config) -> dict[str, Any]:
    """The config as a dict, with its data path relative to the repository."""
    out = config.to_dict()
    out["data_dir"] = relative(out["data_dir"])
    return out


# --------------------------------------------------------------------------------------------
# Views and evaluation tensors shared with the PyTorch reference.


def make_views_fn(prep) -> Callable[[Any, int, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``views(rng, step, images) -> (view1, view2)`` as the JAX training step draws them.

    The step (``msad_jax.train_step.make_train_step`` with an ``augment_fn``) draws view ``v`` of
    row ``r`` of the global batch at step ``s`` with key ``example_keys(rng, s, v, r)`` from the
    state's ``rng`` (``jax.random.key(config.seed)``, never changed) and ``s`` = the number of
    steps taken before it. Given the whole global batch (padding rows included), this returns the
    same float32 ``[B, S, S, 3]`` views.
    """
    import jax
    import jax.numpy as jnp

    from msad_jax.data import augment
    from msad_jax.train_step import example_keys

    augment_fn = augment.make_augment_fn(prep)

    @jax.jit
    def views(rng, step, images):
        rows = jnp.arange(images.shape[0])
        return tuple(augment_fn(example_keys(rng, step, v, rows), images) for v in (0, 1))

    def call(rng, step: int, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        v1, v2 = views(rng, jnp.asarray(step, jnp.int32), images)
        return np.asarray(v1), np.asarray(v2)

    return call


def training_batches(
    images: np.ndarray, *, batch_size: int, seed: int, epoch: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(images [B, H, W, 3], mask [B])``: one epoch's global batches in the product's order."""
    from msad_jax.data import pipeline

    for batch in pipeline.train_batches(
        images, global_batch_size=batch_size, num_devices=1, seed=seed, epoch=epoch
    ):
        yield batch["image"][0], batch["mask"][0]


# --------------------------------------------------------------------------------------------
# One JAX run (the product path).


def step_losses(workdir: pathlib.Path) -> list[float]:
    """Training loss of every step from ``metrics.jsonl`` (a repeated step: its last value)."""
    losses: dict[int, float] = {}
    path = workdir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if "loss" in row and "auroc" not in row and "step" in row:
                losses[int(row["step"])] = float(row["loss"])
    return [losses[s] for s in sorted(losses)]


def compactness(center: np.ndarray, gallery: np.ndarray) -> dict[str, float]:
    """Mean cos(phi, c_hat) of the normal training features: before and after fine-tuning.

    ``center`` is the mean of the pretrained phi (its norm is the mean cosine before training);
    ``gallery`` the final phi. ``after_own_center``: the norm of the final features' mean.
    """
    center = np.asarray(center, np.float64)
    gallery = np.asarray(gallery, np.float64)
    norm = float(np.linalg.norm(center))
    return {
        "before": norm,
        "after": float(np.mean(gallery @ (center / norm))),
        "after_own_center": float(np.linalg.norm(gallery.mean(axis=0))),
    }


# Besides run_setup.RESUME_KEYS, what a finished report in a workdir must agree on to be reused.
REPORT_KEYS = ("epochs", "max_steps", "knn_k", "eval_every_epochs", "image_size")


def finished_report(config, workdir: pathlib.Path) -> dict[str, Any] | None:
    """The product's ``report.json`` in ``workdir`` if it is a finished run of ``config``.

    (A run the product finished already, e.g. a pilot started from the command line, is read
    instead of being evaluated once more.)
    """
    from msad_jax.run_files import RUN_INFO_FILE
    from msad_jax.run_setup import RESUME_KEYS

    report_file, info_file = workdir / "report.json", workdir / RUN_INFO_FILE
    if not (report_file.is_file() and info_file.is_file()):
        return None
    saved = json.loads(info_file.read_text(encoding="utf-8"))["config"]
    # A key the saved run does not have is newer than that run; it had the key's default.
    if any(k in saved and saved[k] != config[k] for k in (*RESUME_KEYS, *REPORT_KEYS)):
        return None
    report = json.loads(report_file.read_text(encoding="utf-8"))
    evaluated = [h["epoch"] for h in report["history"] if "auroc" in h]
    return report if evaluated and evaluated[-1] == config.epochs else None


def run_jax(spec: RunSpec, config, workdir: pathlib.Path) -> dict[str, Any]:
    """Trains and evaluates one run through ``train_and_evaluate``; returns the record's body."""
    from msad_jax.checkpointing import RunCheckpoints
    from msad_jax.train import DETECTOR_FILE, train_and_evaluate

    resumed = (workdir / "checkpoints").exists()
    report = finished_report(config, workdir) or train_and_evaluate(config, str(workdir))
    checkpoints = RunCheckpoints(workdir / "checkpoints")
    try:
        center = np.asarray(checkpoints.restore_arrays()["center"])
    finally:
        checkpoints.close()
    with np.load(workdir / DETECTOR_FILE, allow_pickle=False) as detector:
        gallery = detector["gallery"]
    history = [
        {
            "epoch": h["epoch"],
            "step": h["step"],
            "auroc": h.get("auroc"),
            "average_precision": h.get("average_precision"),
            "fpr_at_95_tpr": h.get("fpr_at_95_tpr"),
            "mean_loss": h.get("mean_loss"),
            "train_seconds": h.get("train_seconds"),
            "eval_seconds": h.get("seconds"),
        }
        for h in report["history"]
    ]
    return {
        "counts": report["counts"],
        "history": history,
        "step_losses": step_losses(workdir),
        "compactness": compactness(center, gallery),
        "resumed": resumed,
    }


# --------------------------------------------------------------------------------------------
# One PyTorch reference run.


def torch_scores(gallery, queries, k: int) -> np.ndarray:
    """Sum of squared L2 distances to the ``k`` nearest gallery rows (torch, float64)."""
    import torch

    g = torch.as_tensor(gallery, dtype=torch.float64)
    q = torch.as_tensor(queries, dtype=torch.float64)
    d = (q * q).sum(1, keepdim=True) + (g * g).sum(1)[None, :] - 2.0 * q @ g.T
    return torch.topk(d.clamp_min(0.0), k, dim=1, largest=False).values.sum(1).numpy()


def torch_metrics(gallery, test, labels, k: int) -> dict[str, float]:
    """kNN scores (torch) and ROC-AUC / AP (scikit-learn)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    scores = torch_scores(gallery, test, k)
    return {
        "auroc": float(roc_auc_score(labels, scores)),
        "average_precision": float(average_precision_score(labels, scores)),
    }


def torch_model(backbone: str):
    """The PyTorch reference model of a backbone and the prefix of its parameter names."""
    import torch_reference

    if not backbone.startswith("efficientnet_lite"):
        raise SystemExit(
            f"error: the PyTorch reference runs EfficientNet-Lite only, not {backbone}."
        )
    return torch_reference.torch_efficientnet_lite(backbone), "net."


def run_torch(
    spec: RunSpec, config, data, workdir: pathlib.Path, *, stop_after_epochs: int | None = None
) -> dict[str, Any] | None:
    """Trains the PyTorch reference on the JAX run's views; returns the record's body.

    Resumes from ``<workdir>/torch_state.pt`` (trainable parameters, center, history) after the
    last finished epoch. ``stop_after_epochs`` ends early (returns None) to test resuming.
    """
    import jax
    import torch
    import torch.nn.functional as F
    import torch_reference

    from msad_jax import train
    from msad_jax.data import transforms
    from msad_jax.models import backbone_spec

    torch.manual_seed(spec.seed)
    bspec = backbone_spec(config.backbone)
    prep = train.preprocessing_for(config, bspec)
    model, prefix = torch_model(config.backbone)
    trainable = torch_reference.freeze_regex(
        model, train.frozen_patterns(config, bspec), strip_prefix=prefix
    )
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    eval_fn = jax.jit(lambda x: transforms.eval_transform(x, prep))
    labels = np.asarray(data.test_labels)
    k = config.knn_k

    def phi_of(images: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(images), config.eval_batch_size):
            x = np.array(eval_fn(images[start : start + config.eval_batch_size]))
            with torch.no_grad():
                feats = model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
            out.append(F.normalize(feats.float(), dim=1).numpy())
        return np.concatenate(out)

    state_path = workdir / "torch_state.pt"
    workdir.mkdir(parents=True, exist_ok=True)
    resumed = state_path.is_file()
    if resumed:
        saved = torch.load(state_path, map_location="cpu", weights_only=True)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name in names:
                params[name].copy_(saved["params"][name])
        center = saved["center"].numpy()
        history = json.loads(saved["history"])
        losses_so_far = json.loads(saved["step_losses"])
    else:
        t0 = time.perf_counter()
        gallery = phi_of(data.train_images)
        center = gallery.astype(np.float64).mean(axis=0).astype(np.float32)
        history = [
            {
                "epoch": 0,
                "step": 0,
                **torch_metrics(gallery, phi_of(data.test_images), labels, k),
                "mean_loss": None,
                "train_seconds": None,
                "eval_seconds": time.perf_counter() - t0,
            }
        ]
        losses_so_far = []
    step = torch_reference.MSCStep(
        model,
        torch.from_numpy(center),
        learning_rate=spec.learning_rate,
        weight_decay=config.weight_decay,
        temperature=config.temperature,
        loss=spec.method,
        trainable=trainable,
    )
    views = make_views_fn(prep)
    rng = jax.random.key(spec.seed)
    steps_per_epoch, total_steps = train.training_steps(config, len(data.train_images))
    start_epoch = history[-1]["epoch"]
    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        epoch_losses = []
        for offset, (images, mask) in enumerate(
            training_batches(
                data.train_images, batch_size=config.batch_size, seed=spec.seed, epoch=epoch
            )
        ):
            global_step = epoch * steps_per_epoch + offset
            if global_step >= total_steps:
                break
            v1, v2 = views(rng, global_step, images)
            t1 = torch.from_numpy(v1[mask]).permute(0, 3, 1, 2).contiguous()
            t2 = torch.from_numpy(v2[mask]).permute(0, 3, 1, 2).contiguous()
            epoch_losses.append(float(step(t1, t2)))
        train_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        gallery = phi_of(data.train_images)
        metrics = torch_metrics(gallery, phi_of(data.test_images), labels, k)
        history.append(
            {
                "epoch": epoch + 1,
                "step": min((epoch + 1) * steps_per_epoch, total_steps),
                **metrics,
                "mean_loss": float(np.mean(epoch_losses)) if epoch_losses else None,
                "train_seconds": train_seconds,
                "eval_seconds": time.perf_counter() - t0,
            }
        )
        losses_so_far += epoch_losses
        partial = state_path.with_name(state_path.name + ".partial")
        params = dict(model.named_parameters())
        torch.save(
            {
                "params": {n: params[n].detach().clone() for n in names},
                "center": torch.from_numpy(center),
                "history": json.dumps(history),
                "step_losses": json.dumps(losses_so_far),
            },
            partial,
        )
        os.replace(partial, state_path)
        logging.info(
            "torch epoch %d: ROC-AUC %.2f%%, mean loss %s",
            epoch + 1,
            100 * metrics["auroc"],
            history[-1]["mean_loss"],
        )
        if stop_after_epochs is not None and epoch + 1 - start_epoch >= stop_after_epochs:
            return None
    if len(history) == 1:  # no training at all: the gallery is the pretrained one
        gallery = phi_of(data.train_images)
    return {
        "counts": data.counts(),
        "history": history,
        "step_losses": losses_so_far,
        "compactness": compactness(center, gallery),
        "resumed": resumed,
        "torch_threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------
# Records.


def record_path(records: pathlib.Path, spec: RunSpec) -> pathlib.Path:
    """Where the record of ``spec`` goes."""
    return records / f"{spec.name}.json"


def execute(
    spec: RunSpec,
    base,
    *,
    workdir: pathlib.Path,
    records: pathlib.Path,
    subsets: exact_cifar.ExactSubsets,
    stop_after_epochs: int | None = None,
) -> dict[str, Any] | None:
    """Runs one spec (unless its record exists) and writes its record; returns the record."""
    from msad_jax import train
    from msad_jax.models import backbone_spec

    if spec.implementation == "torch" and spec.augment != "device":
        raise SystemExit(
            f"error: {spec.name}: the PyTorch reference trains on the device views only."
        )
    data_zip = exact_cifar.ensure_png_zip(subsets, workdir / ZIP_NAME)
    config = run_config(base, spec, data_zip)
    ident = identity(spec, config, subsets.sha256)
    path = record_path(records, spec)
    done = run_records.existing_record(path, ident)
    if done is not None:
        return done
    data = train.load_data(config, spec.normal_class)
    exact_cifar.check_one_class(data, subsets, spec.normal_class)
    run_dir = workdir / spec.name
    sampler = run_records.LoadSampler().start()
    start = time.time()
    if spec.implementation == "jax":
        body = run_jax(spec, config, run_dir)
    else:
        body = run_torch(spec, config, data, run_dir, stop_after_epochs=stop_after_epochs)
    end = time.time()
    sampler.stop()
    if body is None:
        return None
    history = body.pop("history")
    record = {
        "spec": ident,
        "name": spec.name,
        "implementation": spec.implementation,
        "backbone": spec.backbone,
        "normal_class": spec.normal_class,
        "class_name": data.normal_class_name,
        "method": spec.method,
        "learning_rate": spec.learning_rate,
        "seed": spec.seed,
        "augment": spec.augment,
        "epochs": config.epochs,
        "steps_per_epoch": train.training_steps(config, len(data.train_images))[0],
        "data": exact_cifar.DATA_LABEL,
        "data_sha256": subsets.sha256,
        "auroc": [h["auroc"] for h in history],
        "average_precision": [h["average_precision"] for h in history],
        "history": history,
        **body,
        "config": plain_config(config),
        "preprocessing": dataclasses.asdict(
            train.preprocessing_for(config, backbone_spec(config.backbone))
        ),
        "timing": {
            "wall_s": end - start,
            "resumed": body["resumed"],
            "note": "wall_s covers this process only; a resumed run also ran before",
        },
        "load_1min": sampler.between(start, end),
        "workdir": relative(run_dir),
        **run_records.provenance(),
    }
    run_records.write_record(path, record)
    return record


# --------------------------------------------------------------------------------------------
# Main.


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=pathlib.Path, default=run_records.DEFAULT_DATA)
    parser.add_argument("--config", type=pathlib.Path, default=DEFAULT_CONFIG)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workdir", type=pathlib.Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--results", type=pathlib.Path, default=DEFAULT_RESULTS)
    parser.add_argument(
        "--lr", type=float, default=None, help="the higher learning rate (default: the config's)"
    )
    parser.add_argument("--published_lr", type=float, default=1e-5)
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--only", default="", help="comma-separated run names")
    parser.add_argument("--dry_run", action="store_true", help="list the grid and its status")
    parser.add_argument("--in_process", action="store_true", help="no child processes")
    parser.add_argument("--no_report", action="store_true", help="do not regenerate the report")
    parser.add_argument(
        "--pilot_lrs",
        default="",
        help="instead of the grid: class 0, MSC, seed 0 at these learning rates for "
        "--pilot_epochs epochs (records in <results>/pilot; the grid resumes their workdirs)",
    )
    parser.add_argument("--pilot_epochs", type=int, default=3)
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--skip_hash_check", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("absl", "jax", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _summary(record: dict[str, Any]) -> str:
    curve = " ".join(f"{100 * a:.2f}" for a in record["auroc"])
    return f"ROC-AUC per epoch {curve} ({record['timing']['wall_s'] / 60:.1f} min)"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    subsets = exact_cifar.load_subsets(args.data, check_hash=not args.skip_hash_check)
    base = load_config(args.config)
    apply_overrides(base, args.set)
    from msad_jax.config import ConfigError, validate_config

    if base.augment != "device":
        raise SystemExit(
            "error: --set augment: the training views belong to each run (the runs named "
            "..._pil use Pillow views); leave augment at 'device'."
        )
    base.data_dir = str(args.workdir / ZIP_NAME)
    if args.lr is None:
        args.lr = base.learning_rate
    try:
        validate_config(base)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    grid = build_grid(
        backbone=base.backbone,
        lr=args.lr,
        published_lr=args.published_lr,
        num_classes=args.num_classes,
        first_classes=[c for c in FIRST_CLASSES if c < args.num_classes],
    )
    records = args.results / "records"
    if args.pilot_lrs:
        base.epochs = args.pilot_epochs
        rates = [float(x) for x in args.pilot_lrs.split(",")]
        grid = [RunSpec(base.backbone, 0, "msc", rate, 0, "jax") for rate in rates]
        records = args.results / "pilot"
    by_name = {spec.name: spec for spec in grid}
    if args.child:
        import jax

        _setup_logging()
        args.workdir.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(args.workdir / "jax_cache"))
        spec = find_run(grid, args.child)
        execute(spec, base, workdir=args.workdir, records=records, subsets=subsets)
        return 0
    if args.only:
        unknown = [n for n in args.only.split(",") if n not in by_name]
        if unknown:
            raise SystemExit(f"error: --only {unknown}: not in the grid; see --dry_run.")
        grid = [by_name[n] for n in args.only.split(",")]
    print(f"{len(grid)} runs; records in {relative(records)}", flush=True)
    failed: list[str] = []
    durations: list[float] = []
    for index, spec in enumerate(grid):
        path = record_path(records, spec)
        if path.is_file():
            print(f"[{index + 1}/{len(grid)}] {spec.name}: done", flush=True)
            continue
        if args.dry_run:
            print(f"[{index + 1}/{len(grid)}] {spec.name}: to run", flush=True)
            continue
        t0 = time.time()
        print(
            f"[{index + 1}/{len(grid)}] {spec.name}: start {time.strftime('%H:%M')} "
            f"(load {os.getloadavg()[0]:.1f})",
            flush=True,
        )
        if args.in_process:
            _setup_logging()
            execute(spec, base, workdir=args.workdir, records=records, subsets=subsets)
            code = 0
        else:
            child = [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])]
            child = [a for a in child if a not in ("--in_process",)]
            code = subprocess.run([*child, "--child", spec.name], check=False).returncode
        if code or not path.is_file():
            failed.append(spec.name)
            print(f"[{index + 1}/{len(grid)}] {spec.name}: FAILED (exit {code})", flush=True)
            continue
        durations.append(time.time() - t0)
        left = sum(1 for s in grid[index + 1 :] if not record_path(records, s).is_file())
        print(
            f"[{index + 1}/{len(grid)}] {spec.name}: {_summary(run_records.read_record(path))}; "
            f"{left} runs left, about {left * np.mean(durations) / 3600:.1f} h",
            flush=True,
        )
        if not args.no_report and not args.pilot_lrs:
            import cifar10_exact_report

            cifar10_exact_report.main(
                [
                    *("--results", str(args.results), "--no_readme"),
                    *("--lr", str(args.lr), "--published_lr", str(args.published_lr)),
                ]
            )
    if failed:
        print(f"failed: {', '.join(failed)} (run the same command again to retry)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
