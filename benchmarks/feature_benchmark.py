"""Feature-extraction throughput: msad_jax vs PyTorch, side by side.

Work per repetition: phi (unit-norm pooled features) of ``--images`` uint8 images of side
``--source`` (32 = CIFAR), in batches of ``--batch``: the backbone's evaluation transform
(ResNet-18: resize to 224 bicubic; ResNet-50/101/152: resize 256 bilinear + center crop 224),
scaling to [0, 1], ImageNet normalisation, forward with BatchNorm in inference mode, L2
normalisation; the features end up in one host array.

* JAX: :func:`msad_jax.features.extract_features` with the pmapped extractor and
  :func:`msad_jax.data.pipeline.eval_batches` (the path the main job takes: host batching, device
  transfer, preprocessing on the device, grouped fetches of the results).
* PyTorch: a loop over the same batches: tensor from NumPy, resize with ``F.interpolate``,
  normalise, forward under ``no_grad``, ``F.normalize``, concatenate.

Same weights on both sides (torchvision's initialisation under one seed). Each side in its own
process, runs alternated, first call (compilation) reported separately.

Usage (repository root)::

    python benchmarks/feature_benchmark.py --backbone resnet18 --images 256 --batch 64
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402


def jax_setup(args: argparse.Namespace):
    import jax
    import jax.numpy as jnp
    from torch_reference import state_dict_numpy

    from msad_jax.data.pipeline import eval_batches
    from msad_jax.data.transforms import make_preprocess_fn
    from msad_jax.features import extract_features, make_feature_extractor
    from msad_jax.models import backbone_spec, build_backbone, from_torchvision
    from msad_jax.train_step import replicate_state

    spec = backbone_spec(args.backbone)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    model = build_backbone(args.backbone, dtype=dtype)
    variables = replicate_state(
        from_torchvision(state_dict_numpy(args.backbone), args.backbone, with_classifier=False)
    )
    extractor = make_feature_extractor(model, make_preprocess_fn(spec.preprocessing))
    images = harness.make_images(args.images, args.source)
    n = jax.local_device_count()

    def run() -> float:
        batches = eval_batches(images, global_batch_size=args.batch, num_devices=n)
        phi = extract_features(extractor, variables, batches)
        assert phi.shape[0] == len(images)
        return float(phi[:, 0].mean())

    return {"extract": run}, {"devices": n, "backend": jax.default_backend()}


def torch_setup(args: argparse.Namespace):
    import torch
    from torch_reference import eval_features, torch_backbone

    from msad_jax.models import backbone_spec

    torch.set_num_threads(args.torch_threads or os.cpu_count())
    prep = backbone_spec(args.backbone).preprocessing
    model = torch_backbone(args.backbone)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    images = harness.make_images(args.images, args.source)
    autocast = torch.bfloat16 if args.dtype == "bfloat16" else None
    mode = "bicubic" if prep.method == "bicubic" else "bilinear"

    def run() -> float:
        out = []
        for start in range(0, len(images), args.batch):
            chunk = torch.from_numpy(images[start : start + args.batch])
            out.append(
                eval_features(
                    model, chunk, prep.resize, prep.crop, mode=mode, autocast_dtype=autocast
                )
            )
        phi = torch.cat(out).numpy()
        return float(phi[:, 0].mean())

    return {"extract": run}, {"threads": torch.get_num_threads()}


def contenders(args: argparse.Namespace) -> list[harness.Contender]:
    # The options the workers get.
    options = (
        "backbone",
        "images",
        "source",
        "batch",
        "dtype",
        "warmup",
        "torch_threads",
        "channels_last",
    )
    return harness.standard_contenders(__file__, harness.forward_flags(args, *options), args)


def report(args: argparse.Namespace, session: harness.Session) -> str:
    title = (
        f"### Feature extraction: {args.backbone}, {args.images} images {args.source}x"
        f"{args.source} -> 224, batch {args.batch}, {args.dtype}"
    )
    cross_check = (
        "- mean of feature 0 over the images (loose cross-check; resize kernels differ "
        "slightly): " + harness.first_results(session, "extract", 5)
    )
    table = harness.throughput_table(
        session, "extract", items_per_call=args.images, reference="torch"
    )
    return harness.markdown_report(title, session, notes=[cross_check], body=table)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--source", type=int, default=32, help="side of the stored images")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    harness.add_common_arguments(p)
    return p.parse_args(argv)


def coordinate(args: argparse.Namespace) -> str:
    session = harness.alternate(contenders(args), ["extract"], repetitions=args.repetitions)
    return report(args, session)


def main(argv: list[str] | None = None) -> None:
    harness.dispatch(parse(argv), {"jax": jax_setup, "torch": torch_setup}, coordinate)


if __name__ == "__main__":
    main()
