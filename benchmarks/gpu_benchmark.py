"""One prepared GPU benchmark: msad_jax vs PyTorch on the same GPU, one table (ResNet-152).

Measures, on one accelerator, JAX and PyTorch side by side (each in its own process, runs
alternated, compilation excluded and reported separately):

* training step: ResNet-152 at 224x224, batch 64 (two views = 128 forward/backward passes), MSC
  loss, SGD with weight decay, frozen conv1/bn1/layer1/layer2 (the recipe), BatchNorm in
  inference mode; float32 and bfloat16 compute (parameters float32 on both sides: JAX
  ``dtype=bfloat16`` modules, PyTorch ``autocast``);
* feature extraction: eval transform (32x32 uint8 -> resize 256 -> crop 224 -> normalise) +
  forward + L2 normalisation of a batch of 64, float32 and bfloat16;
* kNN scoring: 50000 gallery x 10000 queries x 2048 dims, k = 2, float32
  (:func:`msad_jax.knn.knn_scores` vs a chunked ``addmm`` + ``topk`` in PyTorch);
* model FLOP utilisation: FLOPs per call from XLA's cost analysis of the compiled JAX programs
  (the same work is done by PyTorch, so the same count is used for both), divided by the time
  and by the datasheet peak of an H100/H200 SXM (dense: bf16 989 TFLOP/s, TF32 495, plain fp32
  67).

"float32" means float32 storage with TensorFloat-32 tensor-core math allowed on both sides
(JAX's default precision on NVIDIA GPUs; PyTorch ``allow_tf32 = True``), the peak used for MFU is
then TF32's; ``--strict_fp32`` forbids TF32 on both sides (JAX ``highest`` precision) and uses the
plain fp32 peak.

Budget: built to finish in well under 8 minutes on one H200 (two worker processes start and
compile in parallel; ``--repetitions`` x ``--calls`` timed calls per task afterwards).

Vision Transformers: ``--backbone dinov2_vits14`` (or ``vit_base_patch16_224``,
``dinov2_vitb14``...) runs the same table for a ViT: random weights on both sides; PyTorch runs
torchvision's ``VisionTransformer`` of the same size (``benchmarks/vit_reference.py``); both
sides freeze msad_jax's default parameters.

``--small`` runs tiny sizes (ResNet-18 at 64x64, batch 4, kNN 512 x 128 x 64) so the script can
be exercised on a CPU in about a minute; its numbers mean nothing.

Running it on a GPU machine with the packages of ``setup.cfg`` plus torch and torchvision (where
JAX and PyTorch are there but dm-pix is not, ``pip install --no-deps dm-pix==0.4.5`` suffices)::

    python benchmarks/gpu_benchmark.py --out gpu.md
    python benchmarks/gpu_benchmark.py --backbone dinov2_vits14 --out gpu_dinov2.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

# Dense datasheet peaks of an H100/H200 SXM, TFLOP/s (no sparsity).
PEAK_TFLOPS = {"bfloat16": 989.4, "tf32": 494.7, "float32": 66.9}
DTYPES = ("float32", "bfloat16")


def sizes(args: argparse.Namespace) -> dict[str, int | str]:
    if args.small:
        return {
            "backbone": "resnet18",
            "size": 64,
            "batch": 4,
            "source": 32,
            "gallery": 512,
            "queries": 128,
            "dim": 64,
        }
    return {
        "backbone": args.backbone,
        "size": 224,
        "batch": args.batch,
        "source": 32,
        "gallery": 50000,
        "queries": 10000,
        "dim": 2048,
    }


def task_names() -> list[str]:
    return [f"train_{d}" for d in DTYPES] + [f"extract_{d}" for d in DTYPES] + ["knn"]


def _inputs(s: dict, dim: int):
    rng = np.random.default_rng(0)
    view1 = rng.standard_normal((s["batch"], s["size"], s["size"], 3), dtype=np.float32)
    view2 = rng.standard_normal((s["batch"], s["size"], s["size"], 3), dtype=np.float32)
    center = harness.random_center(rng, dim)
    images = rng.integers(0, 256, (s["batch"], s["source"], s["source"], 3), dtype=np.uint8)
    gallery = rng.standard_normal((s["gallery"], s["dim"]), dtype=np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = rng.standard_normal((s["queries"], s["dim"]), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return view1, view2, center, images, gallery, queries


def _flops(lowered) -> float:
    """FLOPs of a lowered program from XLA's HLO cost analysis (no second compilation)."""
    cost = lowered.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def jax_setup(args: argparse.Namespace):
    import dataclasses

    import jax
    import jax.numpy as jnp
    from torch_reference import state_dict_numpy

    from msad_jax.data.transforms import make_preprocess_fn
    from msad_jax.features import make_feature_extractor
    from msad_jax.knn import knn_scores
    from msad_jax.models import backbone_spec, build_backbone, from_torchvision, init_variables
    from msad_jax.train_step import replicate_state

    if args.strict_fp32:
        jax.config.update("jax_default_matmul_precision", "highest")
    s = sizes(args)
    name = s["backbone"]
    spec = backbone_spec(name)
    prep = (
        spec.preprocessing
        if not args.small
        else dataclasses.replace(spec.preprocessing, resize=s["size"], crop=None)
    )
    if spec.layout == "torchvision":
        variables = from_torchvision(state_dict_numpy(name), name, with_classifier=False)
    else:  # ViTs: random weights on both sides
        variables = init_variables(build_backbone(name), s["size"], seed=0)
    dim = build_backbone(name).feature_dim
    view1, view2, center, images, gallery, queries = _inputs(s, dim)
    n = jax.local_device_count()
    b = s["batch"] // n

    def shard(x: np.ndarray) -> np.ndarray:
        return x.reshape(n, b, *x.shape[1:])

    batch = jax.device_put(
        {"view1": shard(view1), "view2": shard(view2), "mask": np.ones((n, b), bool)}
    )
    eval_batch = jax.device_put({"image": shard(images), "mask": np.ones((n, b), bool)})
    center = jnp.asarray(center)
    tasks, flops = {}, {}
    for dtype_name in DTYPES:
        dtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
        model = build_backbone(name, dtype=dtype)
        step, state = harness.jax_msc_step(model, variables, frozen=spec.frozen)
        holder = {"state": state}
        flops[f"train_{dtype_name}"] = _flops(step.lower(holder["state"], batch, center))

        def train(step=step, holder=holder) -> float:
            holder["state"], metrics = step(holder["state"], batch, center)
            return float(jax.block_until_ready(metrics["loss"])[0])

        extractor = make_feature_extractor(model, make_preprocess_fn(prep))
        replicated = replicate_state(variables)
        flops[f"extract_{dtype_name}"] = _flops(extractor.lower(replicated, eval_batch))

        def extract(extractor=extractor, replicated=replicated) -> float:
            out = extractor(replicated, eval_batch)
            return float(jax.block_until_ready(out["phi"])[0, 0, 0])

        tasks[f"train_{dtype_name}"] = train
        tasks[f"extract_{dtype_name}"] = extract
    gallery_d, queries_d = jax.device_put(gallery), jax.device_put(queries)
    budget = (1 << 26) if args.small else (8 << 30)

    def knn() -> float:
        scores = knn_scores(gallery_d, queries_d, 2, memory_budget_bytes=budget)
        return float(jax.block_until_ready(scores)[0])

    tasks["knn"] = knn
    flops["knn"] = 2.0 * s["gallery"] * s["queries"] * s["dim"]
    info = {
        "flops": flops,
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
    }
    return tasks, info


def torch_setup(args: argparse.Namespace):
    import torch
    from torch_reference import MSCStep, eval_features, torch_backbone
    from vit_reference import torch_vit

    from msad_jax.models import backbone_spec, build_backbone

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tf32 = not args.strict_fp32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True
    s = sizes(args)
    name = s["backbone"]
    spec = backbone_spec(name)
    resize, crop = (s["size"], None) if args.small else (spec.preprocessing.resize, 224)
    mode = "bicubic" if spec.preprocessing.method == "bicubic" else "bilinear"
    dim = build_backbone(name).feature_dim
    view1, view2, center, images, gallery, queries = _inputs(s, dim)
    vit = spec.layout != "torchvision"

    def backbone() -> torch.nn.Module:
        return torch_vit(name, image_size=s["size"]) if vit else torch_backbone(name)

    def nchw(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(device)

    v1, v2 = nchw(view1), nchw(view2)
    center_t = torch.from_numpy(center).to(device)
    images_t = torch.from_numpy(images).to(device)
    gallery_t = torch.from_numpy(gallery).to(device)
    queries_t = torch.from_numpy(queries).to(device)
    tasks = {}
    for dtype_name in DTYPES:
        autocast = torch.bfloat16 if dtype_name == "bfloat16" else None
        model = backbone().to(device)  # a ViT comes with its frozen parameters set
        frozen = () if vit else spec.frozen
        step = MSCStep(model, center_t, frozen=frozen, autocast_dtype=autocast)

        def train(step=step) -> float:
            return float(step(v1, v2))

        eval_model = backbone().to(device)

        def extract(eval_model=eval_model, autocast=autocast) -> float:
            phi = eval_features(
                eval_model, images_t, resize, crop, mode=mode, autocast_dtype=autocast
            )
            return float(phi[0, 0])

        tasks[f"train_{dtype_name}"] = train
        tasks[f"extract_{dtype_name}"] = extract
    chunk = 2048 if not args.small else 64
    g_sq = (gallery_t * gallery_t).sum(1)

    def knn() -> float:
        out = []
        for start in range(0, len(queries_t), chunk):
            q = queries_t[start : start + chunk]
            d = torch.addmm(g_sq[None, :], q, gallery_t.T, alpha=-2.0)
            d += (q * q).sum(1, keepdim=True)
            out.append(torch.topk(d, 2, dim=1, largest=False).values.clamp_min_(0).sum(1))
        return float(torch.cat(out)[0])

    tasks["knn"] = knn
    info = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    return tasks, info


def contenders(args: argparse.Namespace) -> list[harness.Contender]:
    # The options the workers get.
    options = ("backbone", "batch", "small", "strict_fp32", "warmup")
    base = harness.forward_flags(args, *options)
    # Two frameworks share the GPU: JAX allocates on demand instead of taking 75% up front.
    jax_env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    return harness.standard_contenders(__file__, base, args, jax_env=jax_env)


def table(args: argparse.Namespace, session: harness.Session) -> list[str]:
    s = sizes(args)
    flops = session.ready["jax"]["info"]["flops"]
    fp32_peak = "float32" if args.strict_fp32 else "tf32"
    lines = [
        "| task | dtype | framework | first call s | ms/call (median) | items/s | TFLOP/s | "
        "MFU % | JAX/PyTorch speed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for task in task_names():
        kind, _, dtype = task.partition("_")
        peak = PEAK_TFLOPS["bfloat16" if dtype == "bfloat16" else fp32_peak]
        items = s["queries"] if kind == "knn" else s["batch"]
        torch_wall = session.measurements[("torch", task)].wall
        for framework in ("jax", "torch"):
            m = session.measurements[(framework, task)]
            tflops = flops[task] / m.wall / 1e12
            ratio = f"{torch_wall / m.wall:.2f}" if framework == "jax" else ""
            first = session.ready[framework]["first_call_s"][task]
            lines.append(
                f"| {kind} | {dtype or 'float32'} | {framework} | {first:.1f} | "
                f"{1e3 * m.wall:.2f} | {items / m.wall:.0f} | {tflops:.3g} | "
                f"{100 * tflops / peak:.3g} | {ratio} |"
            )
    return lines


def report(args: argparse.Namespace, session: harness.Session) -> str:
    s = sizes(args)
    jax_info, torch_info = session.ready["jax"]["info"], session.ready["torch"]["info"]
    title = (
        f"### GPU benchmark: {s['backbone']} at {s['size']}, batch {s['batch']}; kNN "
        f"{s['gallery']} x {s['queries']} x {s['dim']}" + (" (--small)" if args.small else "")
    )
    device = (
        f"- device: {jax_info['device']} (JAX {jax_info['jax']}, backend {jax_info['backend']});"
        f" PyTorch {torch_info['torch']} on {torch_info['device']}"
    )
    notes = [
        f"- float32 rows: {'strict fp32' if args.strict_fp32 else 'TF32 math allowed'}; "
        "MFU = XLA cost-analysis FLOPs per call / time / datasheet dense peak "
        f"({PEAK_TFLOPS})",
        "- items/s: images per second (train: images, each with two views; extract: images), "
        "queries per second for kNN",
    ]
    return harness.markdown_report(
        title, session, context=[device], notes=notes, body=table(args, session)
    )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet152")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--small", action="store_true", help="tiny sizes (CPU check)")
    p.add_argument("--strict_fp32", action="store_true", help="no TF32 in the float32 rows")
    harness.add_common_arguments(
        p,
        calls=10,
        warmup=2,
        torch_threads=False,
        channels_last=False,
        jax_variants=False,
        replace_out=True,
    )
    return p.parse_args(argv)


def coordinate(args: argparse.Namespace) -> str:
    start = time.perf_counter()
    calls = {t: (1 if args.small else args.calls) for t in task_names()}
    session = harness.alternate(
        contenders(args),
        task_names(),
        repetitions=args.repetitions,
        calls=calls,
        cooldown_s=0.0 if not args.small else 0.1,
        parallel_start=True,
    )
    return report(args, session) + f"\n- total script time: {time.perf_counter() - start:.0f} s\n"


def main(argv: list[str] | None = None) -> None:
    setups = {"jax": jax_setup, "torch": torch_setup}
    harness.dispatch(parse(argv), setups, coordinate, replace_out=True)


if __name__ == "__main__":
    main()
