"""Augmentation throughput: on-device JAX MoCo-v2 vs the torchvision/PIL pipeline, side by side.

Both produce normalised float32 224x224 views from uint8 source images with the same operations
(RandomResizedCrop(224, scale=(0.2, 1)), ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2,
Gaussian blur sigma ~ U[0.1, 2] p=0.5 (PIL ImageFilter.GaussianBlur, as MoCo v2), flip p=0.5,
Normalize). The JAX side augments a batch (default 128 = 2 views x 64 images) per jitted call on
the default JAX device; the PIL side runs one image at a time in this process, as one
DataLoader worker would. Example::

    python benchmarks/augment_throughput.py --sources 32 256 --seconds 10 \
        --out benchmarks/results/augment_throughput

``--out`` writes the record (``.json``) and the page generated from it (``.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import random
import time

import jax
import numpy as np
import torch
import torchvision
from PIL import Image
from torch_reference import moco_v2_transform  # benchmarks/ is on sys.path (run as a script)

from msad_jax.data.augment import make_augment_fn
from msad_jax.data.transforms import Preprocessing

PREP = Preprocessing(resize=256, crop=224, method="bilinear")


def source_images(n: int, side: int, seed: int = 0) -> np.ndarray:
    """Smooth colourful uint8 images (photo-like statistics matter little for timing)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, side // 4 + 2, side // 4 + 2, 3), dtype=np.uint8)
    return np.stack(
        [np.asarray(Image.fromarray(b).resize((side, side), Image.BILINEAR)) for b in base]
    )


def time_jax(images: np.ndarray, seconds: float) -> tuple[float, float]:
    """Returns (images per second, compile + first call seconds)."""
    augment = jax.jit(make_augment_fn(PREP))
    device_images = jax.device_put(images)
    start = time.perf_counter()
    jax.block_until_ready(augment(jax.random.split(jax.random.key(0), len(images)), device_images))
    compile_s = time.perf_counter() - start
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < seconds:
        keys = jax.random.split(jax.random.key(calls + 1), len(images))
        jax.block_until_ready(augment(keys, device_images))
        calls += 1
    return calls * len(images) / (time.perf_counter() - start), compile_s


def time_torchvision(images: np.ndarray, seconds: float) -> float:
    pipeline = moco_v2_transform(224)
    pils = [Image.fromarray(im) for im in images]
    done, start = 0, time.perf_counter()
    while done < len(pils) or time.perf_counter() - start < seconds:
        pipeline(pils[done % len(pils)])
        done += 1
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sources", type=int, nargs="+", default=[32, 256], help="source sides")
    parser.add_argument("--batch", type=int, default=128, help="JAX batch (2 views x 64)")
    parser.add_argument("--seconds", type=float, default=10.0, help="timing budget per cell")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--out", help="write <out>.json (the record) and <out>.md")
    parser.add_argument("--note", action="append", default=[], help="a line added to the result")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    random.seed(0)
    torch.manual_seed(0)

    load_before = os.getloadavg()
    rows = []
    for side in args.sources:
        images = source_images(args.batch, side)
        jax_rate, compile_s = time_jax(images, args.seconds)
        tv_rate = time_torchvision(images, args.seconds)
        rows.append((side, jax_rate, compile_s, tv_rate))
        print(
            f"source {side}px: jax {jax_rate:.1f} img/s (compile {compile_s:.1f} s), "
            f"torchvision/PIL {tv_rate:.1f} img/s",
            flush=True,
        )
    load_after = os.getloadavg()

    device = jax.devices()[0]
    document = {
        "command": (
            f"python benchmarks/augment_throughput.py --sources "
            f"{' '.join(map(str, args.sources))} --batch {args.batch} --seconds {args.seconds}"
        ),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
        "device": f"{device.platform} ({device.device_kind})",
        "versions": f"jax {jax.__version__}, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}",
        "load_1min": {"before": load_before[0], "after": load_after[0]},
        "batch": args.batch,
        "torch_threads": args.torch_threads,
        "rows": [
            {"source_side": side, "jax_img_s": j, "jax_compile_s": c, "pil_img_s": t}
            for side, j, c, t in rows
        ],
        "notes": args.note,
    }
    text = markdown(document)
    print(text)
    if args.out:
        output = pathlib.Path(args.out).with_suffix("")
        output.parent.mkdir(parents=True, exist_ok=True)
        output.with_suffix(".json").write_text(json.dumps(document, indent=2) + "\n")
        output.with_suffix(".md").write_text(text)


def markdown(document: dict) -> str:
    """The results page of a record (``--out`` writes both)."""
    lines = [
        "# Augmentation throughput (MoCo-v2 views at 224x224)",
        "",
        "Kind: measured. Generated by `python benchmarks/render_results.py` from the record "
        "beside this file (.json).",
        "",
        f"- command: `{document['command']}`",
        f"- machine: {document['machine']}; JAX device: {document['device']}; "
        f"{document['versions']}",
        f"- load average (1 min) before/after: {document['load_1min']['before']:.2f} / "
        f"{document['load_1min']['after']:.2f}",
        f"- JAX: one jitted call per batch of {document['batch']} images; torchvision/PIL: one "
        f"image at a time in one process, torch threads = {document['torch_threads']}",
        "",
        "| source side | JAX img/s | JAX compile s | torchvision/PIL img/s | JAX / PIL |",
        "|---|---|---|---|---|",
    ]
    for row in document["rows"]:
        lines.append(
            f"| {row['source_side']} | {row['jax_img_s']:.1f} | {row['jax_compile_s']:.1f} | "
            f"{row['pil_img_s']:.1f} | {row['jax_img_s'] / row['pil_img_s']:.2f} |"
        )
    if document.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {note}" for note in document["notes"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
