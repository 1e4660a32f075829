"""One training epoch end to end (data + augmentation + steps), and where its time goes.

Work: one epoch over ``--images`` uint8 images of side ``--source`` with global batch ``--batch``
(the last short batch kept, as the main job does), ResNet at ``--size``, MSC loss, SGD.
Every contender serves four tasks, timed separately and alternated like the other benchmarks:

* ``data``: JAX: ``train_batches`` + ``prefetch_to_device`` only; PyTorch: a ``DataLoader`` of
  the raw images (no augmentation);
* ``augment``: JAX: the on-device MoCo-v2 augmentation of the epoch's batches (two views, jitted,
  per batch); PyTorch: the torchvision/PIL MoCo-v2 pipeline on the epoch's images, two views each
  (one process);
* ``steps``: the epoch's training steps on ready-made views / tensors;
* ``epoch``: the real thing. JAX as ``msad_jax.train`` runs it: host batches -> prefetch -> the
  pmapped step with the augmentation fused in, losses fetched at the end; PyTorch: ``DataLoader``
  with the PIL augmentation -> step, losses fetched at the end.

The split shows what dominates; ``epoch`` is less than the sum of the parts when work overlaps
(JAX dispatches asynchronously: host batching of the next batch runs while the device computes).

Usage (repository root)::

    python benchmarks/epoch_benchmark.py --size 224 --images 64 --batch 16
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

TASKS = ("data", "augment", "steps", "epoch")


def jax_setup(args: argparse.Namespace):
    import dataclasses

    import jax
    import jax.numpy as jnp
    from torch_reference import state_dict_numpy

    from msad_jax.data import augment, pipeline
    from msad_jax.models import backbone_spec, build_backbone, from_torchvision
    from msad_jax.train_step import example_keys, replicate_state

    spec = backbone_spec(args.backbone)
    prep = dataclasses.replace(spec.preprocessing, resize=args.size, crop=None)
    frozen = spec.frozen
    model = build_backbone(args.backbone)
    variables = from_torchvision(
        state_dict_numpy(args.backbone), args.backbone, with_classifier=False
    )
    augment_fn = augment.make_augment_fn(prep)
    fused, fused_state = harness.jax_msc_step(
        model, variables, frozen=frozen, augment_fn=augment_fn
    )
    plain, plain_state = harness.jax_msc_step(model, variables, frozen=frozen)
    state = {"fused": fused_state, "plain": plain_state}
    images = harness.make_images(args.images, args.source)
    rng = np.random.default_rng(1)
    center = jnp.asarray(harness.random_center(rng, harness.feature_dim(args.backbone)))
    n = jax.local_device_count()
    steps = pipeline.steps_per_epoch(len(images), args.batch)
    epoch = [0]

    def batches():
        epoch[0] += 1
        return pipeline.prefetch_to_device(
            pipeline.train_batches(
                images, global_batch_size=args.batch, num_devices=n, seed=0, epoch=epoch[0]
            ),
            size=2,
        )

    @jax.pmap
    def two_views(batch, key):
        b = batch["image"].shape[0]
        rows = jnp.arange(b)
        return tuple(
            augment_fn(example_keys(key, jnp.int32(0), view, rows), batch["image"])
            for view in (0, 1)
        )

    key = replicate_state(jax.random.key(0))
    views = jax.device_put(
        {
            "view1": rng.standard_normal((n, args.batch // n, args.size, args.size, 3), np.float32),
            "view2": rng.standard_normal((n, args.batch // n, args.size, args.size, 3), np.float32),
            "mask": np.ones((n, args.batch // n), bool),
        }
    )

    def data() -> None:
        for batch in batches():
            jax.block_until_ready(batch)

    def augment_task() -> None:
        for batch in batches():
            jax.block_until_ready(two_views(batch, key))

    def steps_task() -> None:
        losses = []
        for _ in range(steps):
            state["plain"], metrics = plain(state["plain"], views, center)
            losses.append(metrics["loss"])
        jax.block_until_ready(losses)

    def epoch_task() -> float:
        losses = []
        for batch in batches():
            state["fused"], metrics = fused(state["fused"], batch, center)
            losses.append(metrics["loss"])
        return float(np.mean(jax.device_get(losses)))

    tasks = {"data": data, "augment": augment_task, "steps": steps_task, "epoch": epoch_task}
    return tasks, {"steps": steps, "devices": n}


def torch_setup(args: argparse.Namespace):
    import torch
    from torch_reference import MSCStep, TwoViewDataset, moco_v2_transform, torch_backbone

    from msad_jax.models import backbone_spec

    torch.set_num_threads(args.torch_threads or os.cpu_count())
    torch.manual_seed(0)
    frozen = backbone_spec(args.backbone).frozen
    model = torch_backbone(args.backbone)
    images = harness.make_images(args.images, args.source)
    rng = np.random.default_rng(1)
    center = torch.from_numpy(harness.random_center(rng, harness.feature_dim(args.backbone)))
    step = MSCStep(model, center, frozen=frozen)
    steps = math.ceil(len(images) / args.batch)
    augmented = torch.utils.data.DataLoader(
        TwoViewDataset(images, args.size),
        batch_size=args.batch,
        shuffle=True,
        num_workers=args.torch_workers,
        drop_last=False,
    )
    raw = torch.utils.data.DataLoader(
        torch.from_numpy(images),
        batch_size=args.batch,
        shuffle=True,
        num_workers=args.torch_workers,
        drop_last=False,
    )
    transform = moco_v2_transform(args.size)
    v1 = torch.from_numpy(rng.standard_normal((args.batch, 3, args.size, args.size), np.float32))
    v2 = torch.from_numpy(rng.standard_normal((args.batch, 3, args.size, args.size), np.float32))

    def data() -> None:
        for _ in raw:
            pass

    def augment_task() -> None:
        from PIL import Image

        for image in images:
            pil = Image.fromarray(image)
            transform(pil)
            transform(pil)

    def steps_task() -> None:
        for _ in range(steps):
            step(v1, v2)

    def epoch_task() -> float:
        losses = [float(step(x1, x2)) for x1, x2 in augmented]
        return float(np.mean(losses))

    tasks = {"data": data, "augment": augment_task, "steps": steps_task, "epoch": epoch_task}
    return tasks, {"steps": steps, "threads": torch.get_num_threads()}


def contenders(args: argparse.Namespace) -> list[harness.Contender]:
    # The options the workers get.
    options = (
        "backbone",
        "images",
        "source",
        "size",
        "batch",
        "warmup",
        "torch_threads",
        "torch_workers",
    )
    return harness.standard_contenders(__file__, harness.forward_flags(args, *options), args)


def split_table(session: harness.Session) -> list[str]:
    """Per contender: median seconds of each task and its share of the summed parts."""
    names = list(session.ready)
    lines = [
        "| contender | data s | augment s | steps s | epoch s | parts sum s | largest part |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        parts = {t: session.measurements[(name, t)].wall for t in TASKS}
        total = sum(parts[t] for t in ("data", "augment", "steps"))
        largest = max(("data", "augment", "steps"), key=parts.get)
        lines.append(
            f"| {name} | {parts['data']:.2f} | {parts['augment']:.2f} | {parts['steps']:.2f} | "
            f"{parts['epoch']:.2f} | {total:.2f} | {largest} "
            f"({100 * parts[largest] / total:.0f}%) |"
        )
    return lines


def report(args: argparse.Namespace, session: harness.Session) -> str:
    title = (
        f"### One epoch: {args.backbone} at {args.size}x{args.size}, {args.images} images "
        f"{args.source}x{args.source}, batch {args.batch}"
    )
    body = [
        "Time split (median wall seconds per epoch):",
        "",
        *split_table(session),
        "",
        "Whole epoch:",
        "",
        *harness.throughput_table(session, "epoch", items_per_call=args.images, reference="torch"),
    ]
    workers = f"- torch DataLoader workers: {args.torch_workers}"
    return harness.markdown_report(title, session, notes=[workers], body=body)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--source", type=int, default=32, help="side of the stored images")
    p.add_argument("--size", type=int, default=224, help="training resolution")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--torch_workers", type=int, default=0, help="DataLoader worker processes")
    harness.add_common_arguments(p, repetitions=3, warmup=0, channels_last=False)
    return p.parse_args(argv)


def coordinate(args: argparse.Namespace) -> str:
    session = harness.alternate(contenders(args), TASKS, repetitions=args.repetitions)
    return report(args, session)


def main(argv: list[str] | None = None) -> None:
    harness.dispatch(parse(argv), {"jax": jax_setup, "torch": torch_setup}, coordinate)


if __name__ == "__main__":
    main()
