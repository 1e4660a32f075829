"""Benchmark: pretrained kNN vs MSC vs standard contrastive fine-tuning on CIFAR-10 (JPEG copy).

For every normal class and every method (``msc``, ``contrastive``) this runs the whole one-class
protocol through :func:`msad_jax.train.train_and_evaluate` in its own workdir
``<workdir>/<method>/class_<i>_<name>/`` and reads that run's ``report.json``: the epoch-0 ROC-AUC
(kNN on the pretrained features, the same for both methods) and the ROC-AUC after fine-tuning.
Both methods share the config (``configs/cifar10_jpeg_efficientnet_lite0.py`` by default) except
``config.loss``, hence the same epochs, seed, data subsets, data order and augmentation draws.

Data: ``--data`` is the CIFAR-10 JPEG zip described in ``../shared/data/README.md`` (read through
the zip, nothing extracted; ``dataset='folder'``). It is a lossy copy: numbers measured on it are
labelled "CIFAR-10 (JPEG copy)" and are not comparable with published CIFAR-10 numbers.

Restartable: a finished (class, method) is skipped (its ``report.json`` and this script's
``benchmark_run.json`` exist); an interrupted one resumes from its checkpoints. Progress (elapsed
time, an estimate of the time left, the load average) goes to stdout.

Also recorded per run: the compactness of the normal training features, i.e. the mean cosine of
phi to the unit center c_hat of the pretrained features, before fine-tuning (which equals the norm
of the unnormalised center) and after it (the final kNN gallery against the same c_hat), and the
norm of the mean of the final features (compactness around their own center).

Usage (from the repository root)::

    nice -n 5 python benchmarks/cifar10_jpeg_efficientnet.py \
        --data ../shared/data/cifar10-jpeg.zip --workdir runs/bench_cifar10_jpeg_lite0 \
        --output benchmarks/results/cifar10_jpeg_efficientnet_lite0

``--set key=value`` overrides config keys (e.g. ``--set learning_rate=1e-5``), ``--classes 0,3``
and ``--methods msc`` restrict the grid; ``--output`` writes ``<output>.json`` (the record: every
run's numbers, the settings, the data file's sha256, the machine and the commit) and
``<output>.md`` generated from it (both written again after every finished run, so a partial
table is always there; ``benchmarks/render_results.py`` regenerates the .md from the .json).
Paths are recorded relative to the repository, or by file name when outside it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import pathlib
import sys
import time
from typing import Any

import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import records  # noqa: E402 -- the benchmarks folder is not a package.
import run_records  # noqa: E402

REPO = records.REPO
DEFAULT_CONFIG = REPO / "configs" / "cifar10_jpeg_efficientnet_lite0.py"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10-jpeg.zip"
METHODS = ("msc", "contrastive")
METHOD_TITLES = {"msc": "MSC", "contrastive": "standard contrastive"}
RUN_FILE = "benchmark_run.json"
TABLE_LABEL = "CIFAR-10 (JPEG copy)"


# --------------------------------------------------------------------------------------------
# Configuration.


def load_config(path: pathlib.Path) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"Config file {path} not found; pass --config configs/<name>.py.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def parse_classes(text: str, count: int) -> list[int]:
    """``'all'``, ``'0-9'`` or ``'0,3,5'`` -> class indices."""
    if text == "all":
        return list(range(count))
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    bad = [c for c in out if not 0 <= c < count]
    if bad:
        raise ValueError(f"--classes: {bad} out of range 0..{count - 1}.")
    return out


# --------------------------------------------------------------------------------------------
# One run.


def run_dir(workdir: pathlib.Path, method: str, index: int, name: str) -> pathlib.Path:
    """Workdir of one (method, class) run."""
    return workdir / method / f"class_{index:02d}_{name}"


def compactness(directory: pathlib.Path) -> dict[str, float]:
    """Mean cos(phi, c_hat) of the normal training features before and after fine-tuning.

    Reads the center (mean of the pretrained phi, never updated; stored in every checkpoint) and
    the final kNN gallery (phi of the training images after fine-tuning, ``detector.npz``).
    """
    from msad_jax.checkpointing import RunCheckpoints
    from msad_jax.train import DETECTOR_FILE

    checkpoints = RunCheckpoints(directory / "checkpoints")
    try:
        center = np.asarray(checkpoints.restore_arrays()["center"], np.float64)
    finally:
        checkpoints.close()
    gallery = np.load(directory / DETECTOR_FILE)["gallery"].astype(np.float64)
    norm = float(np.linalg.norm(center))
    return {
        "before": norm,  # mean_i phi_i . c / ||c|| = ||c|| for c = mean_i phi_i
        "after": float(np.mean(gallery @ (center / norm))),
        "after_own_center": float(np.linalg.norm(gallery.mean(axis=0))),
    }


def run_one(
    config: ml_collections.ConfigDict, directory: pathlib.Path, sampler: run_records.LoadSampler
) -> dict[str, Any]:
    """Trains and evaluates one (class, method) unless it is done; returns its summary."""
    from msad_jax.train import train_and_evaluate

    done_file = directory / RUN_FILE
    if done_file.exists() and (directory / "report.json").exists():
        return json.loads(done_file.read_text())
    resumed = (directory / "checkpoints").exists()
    start = time.time()
    report = train_and_evaluate(config, str(directory))
    end = time.time()
    losses = [h["mean_loss"] for h in report["history"] if h.get("mean_loss") is not None]
    summary = {
        "normal_class": report["normal_class"],
        "class_name": report["class_name"],
        "loss": report["loss"],
        "pretrained_auroc": report["pretrained"]["auroc"],
        "final_auroc": report["final"]["auroc"],
        "final_average_precision": report["final"]["average_precision"],
        "final_fpr_at_95_tpr": report["final"]["fpr_at_95_tpr"],
        "epoch_auroc": {h["epoch"]: h["auroc"] for h in report["history"] if "auroc" in h},
        "epoch_mean_loss": losses,
        "counts": report["counts"],
        "compactness": compactness(directory),
        "wall_s": end - start,
        "resumed": resumed,
        "load_1min": sampler.between(start, end),
    }
    done_file.write_text(json.dumps(summary, indent=2))
    return summary


# --------------------------------------------------------------------------------------------
# Report.


def pct(x: float | None) -> str:
    """A fraction as a percentage with two decimals ('' when missing)."""
    return "" if x is None else f"{100 * x:.2f}"


def markdown(results: dict[str, Any]) -> str:
    """The result table and the settings, as Markdown."""
    rows = results["classes"]
    lines = [
        f"# {TABLE_LABEL}: pretrained kNN vs MSC vs standard contrastive, "
        f"{results['settings']['backbone']}",
        "",
        "Kind: measured. Generated by `python benchmarks/render_results.py` from the record "
        "beside this file (.json), written by "
        f"`{results['command']}`"
        + (f" (finished {results['finished']})." if results.get("finished") else " (partial)."),
        "",
        f"## {TABLE_LABEL}, one-class ROC-AUC % (kNN, k = {results['settings']['knn_k']})",
        "",
        "| class | name | pretrained kNN | MSC | standard contrastive |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['normal_class']} | {row['class_name']} | {pct(row.get('pretrained'))} | "
            f"{pct(row.get('msc'))} | {pct(row.get('contrastive'))} |"
        )
    means = results["means"]
    if means["classes"]:
        lines.append(
            f"| **mean** ({means['classes']} classes) | | **{pct(means.get('pretrained'))}** | "
            f"**{pct(means.get('msc'))}** | **{pct(means.get('contrastive'))}** |"
        )
    lines += [
        "",
        "The pretrained column is epoch 0 of the MSC run (the contrastive run's epoch 0 is the "
        "same model on the same images; the two agree to "
        f"{results['epoch0_max_difference']:.2g}).",
        "",
        "## Conditioning: mean cos(phi, c_hat) of the normal training images",
        "",
        "c_hat: unit center of the pretrained features (SPEC §3). 'after, own' is the norm of the "
        "mean of the fine-tuned features (compactness around their own center).",
        "",
        "| class | before | MSC after | MSC after, own | contrastive after | "
        "contrastive after, own |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        c = row.get("compactness", {})
        msc, con = c.get("msc", {}), c.get("contrastive", {})
        before = msc.get("before", con.get("before"))
        cells = [
            before,
            msc.get("after"),
            msc.get("after_own_center"),
            con.get("after"),
            con.get("after_own_center"),
        ]
        text = " | ".join("" if v is None else f"{v:.3f}" for v in cells)
        lines.append(f"| {row['normal_class']} | {text} |")
    settings = results["settings"]
    lines += [
        "",
        "## Settings",
        "",
        "```",
        *[f"{k} = {v!r}" for k, v in sorted(settings.items())],
        "```",
        "",
        f"Preprocessing: {results['preprocessing']}.",
        "",
        "## Machine, code and time",
        "",
        f"- {describe_machine(results['machine'])}",
        f"- {describe_git(results['git'])}",
        f"- wall time: {results['wall_s'] / 60:.1f} min for the {results['runs']} runs "
        f"(sum of the runs' own times: {results['runs_wall_s'] / 60:.1f} min; per run "
        f"{results['runs_wall_s'] / max(results['runs'], 1):.0f} s on average)",
        f"- 1-minute load average during the runs: mean {results['load']['mean']:.1f}, "
        f"min {results['load']['min']:.1f}, max {results['load']['max']:.1f}",
        "",
    ]
    if results.get("notes"):
        lines += ["## Notes", "", *results["notes"], ""]
    return "\n".join(lines)


def collect(
    summaries: dict[tuple[int, str], dict[str, Any]], classes: list[int], names: list[str]
) -> tuple[list[dict[str, Any]], dict[str, Any], float]:
    """Per-class rows, means over classes with all numbers, and the epoch-0 disagreement."""
    rows, diffs = [], [0.0]
    for index in classes:
        row: dict[str, Any] = {"normal_class": index, "class_name": names[index]}
        pretrained = [
            summaries[(index, m)]["pretrained_auroc"] for m in METHODS if (index, m) in summaries
        ]
        if pretrained:
            row["pretrained"] = pretrained[0]
            diffs.append(max(pretrained) - min(pretrained))
        row["compactness"] = {}
        for method in METHODS:
            if (index, method) in summaries:
                row[method] = summaries[(index, method)]["final_auroc"]
                row["compactness"][method] = summaries[(index, method)]["compactness"]
        rows.append(row)
    complete = [r for r in rows if all(k in r for k in ("pretrained", *METHODS))]
    means: dict[str, Any] = {"classes": len(complete)}
    for key in ("pretrained", *METHODS):
        if complete:
            means[key] = float(np.mean([r[key] for r in complete]))
    return rows, means, float(max(diffs))


def describe_machine(machine: dict[str, Any] | str) -> str:
    """One line for a record's machine (:func:`records.machine`, or the older one-line text)."""
    if isinstance(machine, str):
        return machine
    packages = ", ".join(f"{k} {v}" for k, v in machine["packages"].items() if v)
    return (
        f"{machine['cpu']}, {machine['cores']} cores, ISA extensions "
        f"{', '.join(machine['isa']) or 'unknown'}; {machine['system']}, Python "
        f"{machine['python']}, {packages}"
    )


def describe_git(git: dict[str, Any] | str) -> str:
    """One line for a record's code version (:func:`records.git_state`, or older text)."""
    if isinstance(git, str):
        return f"code: {git}"
    modified = git["modified"]
    return f"code: commit {git['commit'][:10]}" + (
        f", with changes to {', '.join(modified)}" if modified else " (clean tree)"
    )


def sha256(path: pathlib.Path) -> str:
    """The file's sha256 (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def command_line() -> str:
    """The command that is running, with its niceness and publishable paths."""
    niceness = os.nice(0)
    prefix = f"nice -n {niceness} " if niceness else ""
    argv = [os.path.abspath(sys.argv[0]), *sys.argv[1:]]
    return prefix + records.command_line(argv, ["--config", "--data", "--workdir", "--output"])


# --------------------------------------------------------------------------------------------
# Main.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=pathlib.Path, default=DEFAULT_CONFIG)
    parser.add_argument("--data", type=pathlib.Path, default=DEFAULT_DATA)
    parser.add_argument("--workdir", type=pathlib.Path, required=True)
    parser.add_argument("--classes", default="all", help="'all', '0-9' or '0,3,5'")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output", type=pathlib.Path, default=None, help="<output>.md/.json")
    parser.add_argument("--note", action="append", default=[], help="a line for the Notes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not args.data.is_file():
        raise SystemExit(
            f"error: {args.data} not found; pass --data <cifar10-jpeg.zip> "
            "(see ../shared/data/README.md)."
        )
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not set(methods) <= set(METHODS):
        raise SystemExit(f"error: --methods {args.methods!r}: use msc and/or contrastive.")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("absl", "jax", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import dataclasses

    import jax

    from msad_jax import train
    from msad_jax.config import validate_config
    from msad_jax.models import backbone_spec

    base = load_config(args.config)
    base.dataset = "folder"
    base.data_dir = str(args.data.resolve())
    base.progress = False
    run_records.apply_overrides(base, args.set)
    validate_config(base)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # Every class compiles the same two training steps and the same feature extractor: keep the
    # compiled programs across runs (and restarts) instead of compiling them 20 times.
    jax.config.update("jax_compilation_cache_dir", str(workdir / "jax_cache"))

    names = train.class_names(base)
    classes = parse_classes(args.classes, len(names))
    prep = train.preprocessing_for(base, backbone_spec(base.backbone))
    grid = [(c, m) for c in classes for m in methods]
    command = command_line()
    data_sha256 = sha256(args.data)
    print(f"{command}\n{len(grid)} runs: classes {classes}, methods {methods}", flush=True)

    sampler = run_records.LoadSampler().start()
    start = time.time()
    summaries: dict[tuple[int, str], dict[str, Any]] = {}
    fresh_seconds: list[float] = []

    def results(finished: bool) -> dict[str, Any]:
        rows, means, diff = collect(summaries, classes, names)
        runs_wall = float(sum(s["wall_s"] for s in summaries.values()))
        return {
            "label": TABLE_LABEL,
            "command": command,
            "git": records.git_state(),
            "finished": time.strftime("%Y-%m-%d %H:%M") if finished else None,
            "settings": {k: base[k] for k in sorted(base.keys()) if k != "data_dir"}
            | {"data": records.portable(args.data)},
            "data_sha256": data_sha256,
            "preprocessing": dataclasses.asdict(prep),
            "methods": methods,
            "classes": rows,
            "means": means,
            "epoch0_max_difference": diff,
            "runs": len(summaries),
            "runs_wall_s": runs_wall,
            "wall_s": time.time() - start,
            "load": sampler.between(start, time.time()),
            "machine": records.machine(),
            "notes": args.note,
            "per_run": [summaries[key] for key in sorted(summaries)],
        }

    def write(finished: bool) -> None:
        if args.output is None:
            return
        doc = results(finished)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        records.publish(args.output, doc, markdown)

    for done, (index, method) in enumerate(grid):
        config = ml_collections.ConfigDict(base.to_dict())
        config.normal_class = str(index)
        config.loss = method
        directory = run_dir(workdir, method, index, names[index])
        t0 = time.time()
        print(
            f"[{done + 1}/{len(grid)}] class {index} ({names[index]}), {method}: start "
            f"(elapsed {(t0 - start) / 60:.1f} min, load {os.getloadavg()[0]:.1f})",
            flush=True,
        )
        summary = run_one(config, directory, sampler)
        summaries[(index, method)] = summary
        if time.time() - t0 > 1.0:
            fresh_seconds.append(time.time() - t0)
        left = len(grid) - done - 1
        # Runs finished earlier (skipped now) still tell how long a run takes.
        typical = fresh_seconds or [summary["wall_s"]]
        eta = left * float(np.mean(typical)) / 60
        print(
            f"[{done + 1}/{len(grid)}] class {index} ({names[index]}), {method}: "
            f"pretrained {pct(summary['pretrained_auroc'])} -> {pct(summary['final_auroc'])}  "
            f"cos(phi, c) {summary['compactness']['before']:.3f} -> "
            f"{summary['compactness']['after']:.3f}  ({summary['wall_s']:.0f} s; about "
            f"{eta:.0f} min left)",
            flush=True,
        )
        write(finished=False)
    sampler.stop()
    final = results(finished=True)
    write(finished=True)
    print(markdown(final), flush=True)
    return final


if __name__ == "__main__":
    main()
