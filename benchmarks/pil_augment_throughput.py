"""Host (Pillow) MoCo-v2 views: how fast they are made, and whether they keep the step fed.

Three measurements on this machine, one process, in one run (so their ratios are comparable):

* supply: views per second made by :func:`msad_jax.data.pil_augment.host_view_batches` (the
  ``augment='pil'`` path) from ``--source`` px uint8 images to ``--size`` px, with 1, 2, ...
  worker threads (Pillow releases the GIL in its image operations);
* demand: views per second the training step consumes (``2 x batch / step time``) for
  ``--backbone`` (random initial weights; the time does not depend on them) at ``--size``, with
  views already on the device (``augment='pil'``: uint8 views normalised in the step) and with
  the on-device augmentation fused into the step (``augment='device'``: the step takes images);
* fed: views per second of whole epochs as ``msad_jax.train`` runs them (host batches, views,
  prefetch, step) for both settings.

The raw record goes to ``--out`` (JSON); the Markdown table is written from it (``--report``
rewrites the table from an existing record). Usage (repository root)::

    python benchmarks/pil_augment_throughput.py --out benchmarks/results/pil_augment_throughput
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import harness  # noqa: E402


def _load() -> float:
    return os.getloadavg()[0]


def supply(images: np.ndarray, *, batch: int, size: int, workers: int, batches: int) -> float:
    """Views per second made by ``host_view_batches`` (nothing consumes them)."""
    from msad_jax.data import pil_augment, pipeline

    def host_batches():
        for epoch in range(10**6):
            yield from pipeline.train_batches(
                images, global_batch_size=batch, num_devices=1, seed=0, epoch=epoch
            )

    views = pil_augment.host_view_batches(
        host_batches(), size=size, seed=0, first_step=0, workers=workers
    )
    next(views)  # warm the pool
    start = time.perf_counter()
    for _ in range(batches):
        next(views)
    seconds = time.perf_counter() - start
    views.close()
    return 2 * batch * batches / seconds


def supply_processes(
    images: np.ndarray, *, batch: int, size: int, workers: int, batches: int
) -> float:
    """Views per second of the same work in a process pool (results pickled back)."""
    import concurrent.futures
    import multiprocessing

    from msad_jax.data import pil_augment

    chunk = pil_augment.CHUNK
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn")
    ) as pool:

        def one_batch(step: int) -> None:
            picks = np.arange(step * batch, (step + 1) * batch) % len(images)
            futures = [
                pool.submit(
                    pil_augment.batch_views,
                    images[picks[lo : lo + chunk]],
                    picks[lo : lo + chunk],
                    seed=0,
                    step=step,
                    size=size,
                )
                for lo in range(0, batch, chunk)
            ]
            for future in futures:
                future.result()

        one_batch(0)  # start the workers
        start = time.perf_counter()
        for step in range(1, batches + 1):
            one_batch(step)
        seconds = time.perf_counter() - start
    return 2 * batch * batches / seconds


def operation_ms(images: np.ndarray, *, size: int, views: int = 200) -> dict[str, float]:
    """Milliseconds per view of each Pillow operation when applied (one thread)."""
    from PIL import Image

    from msad_jax.data import pil_augment

    rng = np.random.default_rng(0)
    params = [pil_augment.sample_params(rng, *images.shape[1:3]) for _ in range(views)]
    pils = [Image.fromarray(images[i % len(images)]) for i in range(views)]
    on = {"jitter": True, "grayscale": True, "blur": True, "flip": True}
    off = dict.fromkeys(on, False)
    crops = [pil_augment.apply_params(im, dataclasses.replace(p, **off), size)
             for im, p in zip(pils, params, strict=True)]  # fmt: skip
    stages = {
        "crop + resize": lambda im, p: pil_augment.apply_params(im, p, size),
        "brightness": lambda im, p: pil_augment._jitter_op(im, 0, p),
        "contrast": lambda im, p: pil_augment._jitter_op(im, 1, p),
        "saturation": lambda im, p: pil_augment._jitter_op(im, 2, p),
        "hue": lambda im, p: pil_augment._jitter_op(im, 3, p),
        "grayscale": lambda im, p: im.convert("L").convert("RGB"),
        "blur": lambda im, p: im.filter(pil_augment.ImageFilter.GaussianBlur(p.sigma)),
        "flip": lambda im, p: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        "whole view (all applied)": lambda im, p: pil_augment.apply_params(
            im, dataclasses.replace(p, **on), size
        ),
    }
    out = {}
    for name, fn in stages.items():
        sources = pils if name in ("crop + resize", "whole view (all applied)") else crops
        chosen = (
            [dataclasses.replace(p, **off) for p in params] if name == "crop + resize" else params
        )
        start = time.perf_counter()
        for im, p in zip(sources, chosen, strict=True):
            fn(im, p)
        out[name] = 1000 * (time.perf_counter() - start) / views
    return out


def _model_and_step(args: argparse.Namespace, augment: str):
    import jax

    from msad_jax.data import augment as device_augment
    from msad_jax.data import pil_augment
    from msad_jax.models import backbone_spec, build_backbone, init_variables
    from msad_jax.optimizer import make_optimizer
    from msad_jax.train_step import (
        create_train_state,
        make_train_step,
        pmap_train_step,
        replicate_state,
    )

    spec = backbone_spec(args.backbone)
    model = build_backbone(args.backbone)
    variables = init_variables(model, args.size, seed=0)
    frozen = tuple(p for p in args.frozen.split(",") if p) if args.frozen else spec.frozen
    tx = make_optimizer(variables["params"], learning_rate=1e-5, weight_decay=5e-5, frozen=frozen)
    prep = dataclasses.replace(spec.preprocessing, resize=args.size, crop=None)
    step = make_train_step(
        model,
        tx,
        frozen=frozen,
        augment_fn=device_augment.make_augment_fn(prep) if augment == "device" else None,
    )
    if augment == "pil":
        step = pil_augment.with_normalized_views(step, prep)
    state = replicate_state(create_train_state(variables, tx, jax.random.key(0)))
    center = harness.random_center(np.random.default_rng(0), model.feature_dim)
    return pmap_train_step(step), state, center


def _batches(images: np.ndarray, args: argparse.Namespace, augment: str):
    from msad_jax.data import pil_augment, pipeline

    def host():
        for epoch in range(10**6):
            yield from pipeline.train_batches(
                images, global_batch_size=args.batch, num_devices=1, seed=0, epoch=epoch
            )

    if augment == "device":
        return host()
    return pil_augment.host_view_batches(
        host(), size=args.size, seed=0, first_step=0, workers=args.workers
    )


def demand_and_fed(images: np.ndarray, args: argparse.Namespace, augment: str) -> dict[str, Any]:
    """Step-only and fed views per second for one ``augment`` setting."""
    import jax

    from msad_jax.data import pipeline

    step, state, center = _model_and_step(args, augment)
    batches = _batches(images, args, augment)
    fixed = pipeline.shard_to_devices(next(batches))
    start = time.perf_counter()
    state, metrics = step(state, fixed, center)
    jax.block_until_ready(metrics["loss"])
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, fixed, center)
    jax.block_until_ready(metrics["loss"])
    step_s = (time.perf_counter() - start) / args.steps
    fed = pipeline.prefetch_to_device(batches, size=2)
    next(fed)
    start = time.perf_counter()
    for _, batch in zip(range(args.steps), fed, strict=False):
        state, metrics = step(state, batch, center)
    jax.block_until_ready(metrics["loss"])
    fed_s = (time.perf_counter() - start) / args.steps
    batches.close()
    views = 2 * args.batch
    return {
        "compile_s": compile_s,
        "step_s": step_s,
        "step_views_per_s": views / step_s,
        "fed_step_s": fed_s,
        "fed_views_per_s": views / fed_s,
    }


def markdown(record: dict[str, Any]) -> str:
    """The result table of a record."""
    a = record["args"]
    lines = [
        f"# Host (Pillow) MoCo-v2 views vs the training step ({a['backbone']}, {a['size']} px)",
        "",
        f"- command: `{record['command']}`",
        *harness.machine_lines(record["machine"]),
        f"- JAX device: {record['device']}",
        f"- load average (1 min) before/after: {record['load_before']:.2f} / "
        f"{record['load_after']:.2f}",
        f"- source images {a['source']} px, views {a['size']} px, batch {a['batch']} "
        f"(= {2 * a['batch']} views per step), {a['steps']} timed steps per cell",
        "",
        "Supply: views per second made on the host (`host_view_batches`, nothing consuming):",
        "",
        "| workers | threads (product) views/s | vs 1 thread | processes views/s |",
        "|---|---|---|---|",
    ]
    base = record["supply"][0]["views_per_s"]
    for row in record["supply"]:
        lines.append(
            f"| {row['workers']} | {row['views_per_s']:.1f} | {row['views_per_s'] / base:.2f} | "
            f"{row['process_views_per_s']:.1f} |"
        )
    lines += [
        "",
        "Milliseconds per view of each Pillow operation when applied (one thread; a view "
        "applies jitter with p 0.8, grayscale 0.2, blur 0.5, flip 0.5):",
        "",
        "| operation | ms per view |",
        "|---|---|",
        *(f"| {name} | {ms:.3f} |" for name, ms in record["operation_ms"].items()),
    ]
    lines += [
        "",
        "Demand and fed: views per second of the step alone (views already on the device) and "
        f"of steps fed by the host pipeline (`augment='pil'`: {a['workers'] or 'all'} threads):",
        "",
        "| augment | step only views/s | fed views/s | fed / step only | compile s |",
        "|---|---|---|---|---|",
    ]
    for name, row in record["steps"].items():
        lines.append(
            f"| {name} | {row['step_views_per_s']:.1f} | {row['fed_views_per_s']:.1f} | "
            f"{row['fed_views_per_s'] / row['step_views_per_s']:.2f} | {row['compile_s']:.1f} |"
        )
    best = max(r["views_per_s"] for r in record["supply"])
    demand = record["steps"]["pil"]["step_views_per_s"]
    lines += [
        "",
        f"Supply with the most threads / the step's demand (`pil`): {best / demand:.2f}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--frozen", default="", help="comma-separated regexes ('' = default)")
    parser.add_argument("--source", type=int, default=32, help="source image side")
    parser.add_argument("--size", type=int, default=224, help="view side")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per cell")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--supply_batches", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0, help="threads of the fed runs")
    parser.add_argument("--out", required=True, help="output path without extension")
    parser.add_argument("--report", action="store_true", help="only rewrite the table")
    args = parser.parse_args()
    if args.report:
        with open(args.out + ".json", encoding="utf-8") as handle:
            record = json.load(handle)
    else:
        import jax

        images = harness.make_images(256, args.source)
        load_before = _load()
        sizes = {"batch": args.batch, "size": args.size, "batches": args.supply_batches}
        record = {
            "command": "python benchmarks/pil_augment_throughput.py " + " ".join(sys.argv[1:]),
            "args": vars(args),
            "machine": harness.machine_info(),
            "device": str(jax.devices()[0].device_kind),
            "load_before": load_before,
            "supply": [
                {
                    "workers": w,
                    "views_per_s": supply(images, workers=w, **sizes),
                    "process_views_per_s": supply_processes(images, workers=w, **sizes),
                }
                for w in args.threads
            ],
            "operation_ms": operation_ms(images, size=args.size),
            "steps": {a: demand_and_fed(images, args, a) for a in ("pil", "device")},
            "load_after": _load(),
        }
        with open(args.out + ".json", "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2)
    with open(args.out + ".md", "w", encoding="utf-8") as handle:
        handle.write(markdown(record))


if __name__ == "__main__":
    main()
