"""Training-step throughput: msad_jax's MSC step vs a plain PyTorch step, side by side.

One step = two views of ``--batch`` images (so ``2 x batch`` forward and backward passes at
``--size``), MSC loss (phi, shift by the center, re-normalise, NT-Xent over the 2B vectors with
log-sum-exp), backward, SGD with weight decay 5e-5 and no momentum, BatchNorm in inference mode.
Throughput is in images per second (``batch / step time``; each image has two views).

* JAX: :func:`msad_jax.train_step.make_train_step` under :func:`pmap_train_step` (what the main job
  runs: state donated, one device on CPU), views already on the device.
* PyTorch: :class:`torch_reference.MSCStep` on torchvision's model, views already tensors.

Both start from the same weights (torchvision's initialisation under one seed, converted for
JAX) and the same views and center; their first losses are reported as a cross-check. Each side
runs in its own process; repetitions alternate between them (see ``harness.py``); compilation
(the first call) is reported separately and excluded from the medians. Extra JAX contenders with
other XLA flags can be added with ``--jax_variant NAME=FLAGS``.

Usage (repository root)::

    python benchmarks/train_step_benchmark.py --backbone resnet18 --batch 32 --repetitions 5
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402


def make_inputs(batch: int, size: int, dim: int, seed: int = 0):
    """Two views (NHWC float32, roughly ImageNet-normalised range) and a center of norm ~0.6."""
    rng = np.random.default_rng(seed)
    view1 = rng.standard_normal((batch, size, size, 3), dtype=np.float32)
    view2 = rng.standard_normal((batch, size, size, 3), dtype=np.float32)
    return view1, view2, harness.random_center(rng, dim)


def frozen_patterns(option: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """``--frozen``: ``default`` (the backbone's), ``none``, or comma-separated regexes."""
    if option == "default":
        return default
    if option == "none":
        return ()
    return tuple(p for p in option.split(",") if p)


def jax_setup(args: argparse.Namespace):
    import jax
    import jax.numpy as jnp
    from torch_reference import state_dict_numpy

    from msad_jax.models import backbone_spec, build_backbone, from_torchvision

    spec = backbone_spec(args.backbone)
    frozen = frozen_patterns(args.frozen, spec.frozen)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    model = build_backbone(args.backbone, dtype=dtype)
    variables = from_torchvision(state_dict_numpy(args.backbone), args.backbone)
    step, state = harness.jax_msc_step(model, variables, frozen=frozen)
    view1, view2, center = make_inputs(args.batch, args.size, harness.feature_dim(args.backbone))
    n = jax.local_device_count()
    b = args.batch // n
    batch = jax.device_put(
        {
            "view1": view1.reshape(n, b, *view1.shape[1:]),
            "view2": view2.reshape(n, b, *view2.shape[1:]),
            "mask": np.ones((n, b), bool),
        }
    )
    center = jnp.asarray(center)
    holder = {"state": state}

    def run() -> float:
        holder["state"], metrics = step(holder["state"], batch, center)
        return float(jax.block_until_ready(metrics["loss"])[0])

    return {"step": run}, {"devices": n, "backend": jax.default_backend()}


def torch_setup(args: argparse.Namespace):
    import torch
    from torch_reference import MSCStep, torch_backbone

    from msad_jax.models import backbone_spec

    torch.set_num_threads(args.torch_threads or os.cpu_count())
    spec = backbone_spec(args.backbone)
    frozen = frozen_patterns(args.frozen, spec.frozen)
    model = torch_backbone(args.backbone)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    view1, view2, center = make_inputs(args.batch, args.size, harness.feature_dim(args.backbone))

    def nchw(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(x).permute(0, 3, 1, 2)
        return t.contiguous(
            memory_format=torch.channels_last if args.channels_last else torch.contiguous_format
        )

    v1, v2 = nchw(view1), nchw(view2)
    autocast = torch.bfloat16 if args.dtype == "bfloat16" else None
    step = MSCStep(model, torch.from_numpy(center), frozen=frozen, autocast_dtype=autocast)

    def run() -> float:
        return float(step(v1, v2))

    return {"step": run}, {"threads": torch.get_num_threads()}


def contenders(args: argparse.Namespace) -> list[harness.Contender]:
    # The options the workers get.
    options = (
        "backbone",
        "batch",
        "size",
        "dtype",
        "frozen",
        "warmup",
        "torch_threads",
        "channels_last",
    )
    return harness.standard_contenders(__file__, harness.forward_flags(args, *options), args)


def report(args: argparse.Namespace, session: harness.Session) -> str:
    title = (
        f"### Training step: {args.backbone}, {args.size}x{args.size}, batch {args.batch} "
        f"(x2 views), {args.dtype}"
    )
    losses = "- first losses (same weights, views, center): " + harness.first_results(
        session, "step", 6
    )
    table = harness.throughput_table(session, "step", items_per_call=args.batch, reference="torch")
    return harness.markdown_report(title, session, notes=[losses], body=table)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--batch", type=int, default=32, help="images per step (two views each)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument(
        "--frozen",
        default="default",
        help="frozen parameters: 'default' (the backbone's), 'none', or comma-separated regexes "
        "such as '^_conv_stem/,^_bn0/,^_blocks/([0-9]|10)/'",
    )
    harness.add_common_arguments(p, calls=1, calls_help="steps per timed repetition")
    return p.parse_args(argv)


def coordinate(args: argparse.Namespace) -> str:
    session = harness.alternate(
        contenders(args), ["step"], repetitions=args.repetitions, calls={"step": args.calls}
    )
    return report(args, session)


def main(argv: list[str] | None = None) -> None:
    harness.dispatch(parse(argv), {"jax": jax_setup, "torch": torch_setup}, coordinate)


if __name__ == "__main__":
    main()
