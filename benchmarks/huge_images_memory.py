"""Peak memory of a whole run on a folder of huge same-size images.

Writes a folder of ``--count`` photo-like ``--side`` x ``--side`` JPEG training images (plus as
many test images, half of them "anomalous", all the same size), runs the main job on it in a child
process -- ``configs/folder.py`` with ``resnet_tiny`` from random initialisation, one epoch -- and
records the child's peak resident memory (``ru_maxrss`` from ``wait4``), its wall time and what it
logged about the images. The images are decoded at reduced scale and resized to 256 px as they are
read (``msad_jax.data.images``), so the peak should not grow with the image size.

Usage (from the repository root)::

    python benchmarks/huge_images_memory.py measure --out benchmarks/results/huge_images_memory.json
    python benchmarks/huge_images_memory.py render benchmarks/results/huge_images_memory.json \
        --out benchmarks/results/huge_images_memory.md

``measure`` appends one record per call to the JSON file; ``render`` writes the Markdown table of
all records.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def photo_like(seed: int, side: int) -> Image.Image:
    """Smooth colour gradients with mild noise (compresses like a photo), built in row bands."""
    rng = np.random.default_rng(seed)
    freqs = rng.uniform(0.5, 3.0, (3, 2)).astype(np.float32)
    xx = np.arange(side, dtype=np.float32)[None, :] / side
    image = np.empty((side, side, 3), np.uint8)
    for top in range(0, side, 500):
        yy = np.arange(top, min(top + 500, side), dtype=np.float32)[:, None] / side
        for c, (f, g) in enumerate(freqs):
            band = 127.5 + 100 * np.sin(2 * np.pi * (f * xx + g * yy))
            band += rng.normal(0, 4, band.shape).astype(np.float32)
            image[top : top + len(yy), :, c] = np.clip(band, 0, 255)
    return Image.fromarray(image)


def write_folder(root: Path, count: int, side: int) -> int:
    """train/normal (``count`` images), test/normal and test/anomalous (``count // 2`` each)."""
    layout = [("train", "normal", count), ("test", "normal", count // 2)]
    layout.append(("test", "anomalous", count - count // 2))
    total = 0
    seed = 0
    for split, name, n in layout:
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(n):
            path = folder / f"{i}.jpg"
            photo_like(seed, side).save(path, quality=90)
            total += path.stat().st_size
            seed += 1
    return total


def run_child(command: list[str], env: dict[str, str]) -> tuple[int, float, int, str]:
    """Runs ``command``; returns (exit status, wall s, peak RSS in bytes, stderr)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read()
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # Linux: KiB
    return proc.returncode, wall, peak, stderr


def measure(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "huge"
        encoded = write_folder(data, args.count, args.side)
        overrides = [
            f"--config.data_dir={data}",
            "--config.backbone=resnet_tiny",
            "--config.pretrained=False",
            f"--config.batch_size={args.count}",
            f"--config.eval_batch_size={args.count}",
            "--config.epochs=1",
            "--config.progress=False",
            "--config.plots=False",
        ]
        command = [sys.executable, "-m", "msad_jax.main", "--config", "configs/folder.py"]
        command += ["--workdir", str(Path(scratch) / "run"), *overrides]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        load_before = os.getloadavg()[0]
        status, wall, peak, stderr = run_child(command, env)
    summary = [line for line in stderr.splitlines() if "normal class" in line]
    record = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_1min_before": round(load_before, 2),
        "images": {
            "train": args.count,
            "test": args.count,
            "side": args.side,
            "format": "JPEG q90",
            "encoded_mib": round(encoded / 2**20, 1),
            "decoded_full_size_mib": round(2 * args.count * args.side**2 * 3 / 2**20, 1),
        },
        "command": "python -m msad_jax.main --config configs/folder.py --workdir RUN "
        + " ".join(o if "data_dir" not in o else "--config.data_dir=FOLDER" for o in overrides),
        "exit_status": status,
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(peak / 2**20, 1),
        "logged": summary[-1].split("] ", 1)[-1].replace(str(data), "FOLDER") if summary else "",
    }
    if status != 0:
        record["stderr_tail"] = stderr[-2000:]
    path = Path(args.out)
    records = json.loads(path.read_text()) if path.exists() else []
    records.append(record)
    path.write_text(json.dumps(records, indent=2) + "\n")
    print(json.dumps(record, indent=2))


def markdown(records: list[dict], name: str = "huge_images_memory.json") -> str:
    """The Markdown table of the records (``name``: the records' file name, for the header)."""
    lines = [
        "# Peak memory of a run on huge same-size images",
        "",
        f"Written by `benchmarks/huge_images_memory.py render` from `{name}`.",
        "Each row: one run of the command below in a child process; peak RSS is the child's",
        "`ru_maxrss`. The training and test images are JPEGs of one size, photo-like content.",
        "",
        "| date | machine | load (1 min) | images | encoded MiB | full-size decoded MiB "
        "| exit | wall s | peak RSS MiB | logged |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        images = r["images"]
        count = f"{images['train']} + {images['test']} of {images['side']}x{images['side']}"
        lines.append(
            f"| {r['date']} | {r['machine']} | {r['load_average_1min_before']} | {count} "
            f"| {images['encoded_mib']} | {images['decoded_full_size_mib']} | {r['exit_status']} "
            f"| {r['wall_s']} | {r['peak_rss_mib']} | {r['logged']} |"
        )
    lines += ["", "Command (FOLDER: the generated images, RUN: a fresh workdir):", ""]
    lines += sorted({f"    {r['command']}" for r in records}) + [""]
    return "\n".join(lines)


def render(args: argparse.Namespace) -> None:
    records = json.loads(Path(args.records).read_text())
    Path(args.out).write_text(markdown(records, Path(args.records).name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("measure", help="run once and append the record")
    run.add_argument("--count", type=int, default=8, help="training images (as many test ones)")
    run.add_argument("--side", type=int, default=4000, help="image side in pixels")
    run.add_argument("--out", default="benchmarks/results/huge_images_memory.json")
    table = commands.add_parser("render", help="write the Markdown table of the records")
    table.add_argument("records")
    table.add_argument("--out", default="benchmarks/results/huge_images_memory.md")
    args = parser.parse_args()
    if args.command == "measure":
        measure(args)
    else:
        render(args)


if __name__ == "__main__":
    main()
