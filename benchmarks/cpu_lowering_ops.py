"""The CPU lowering's operations alone: forward + both gradients, msad_jax's lowering vs XLA's.

For depthwise convolutions (EfficientNet-Lite0's shapes), 1x1 convolutions and ResNet's
max-pooling, one jitted call computes the output and the gradients with respect to the input and
the kernel (the input only for max-pooling), with the CPU lowering on and off
(``MSAD_JAX_CPU_LOWERING``, read when the function is traced). XLA's lowering is timed both with
its default convolutions (YNNPACK) and with the Eigen convolutions msad_jax selects; the CPU
lowering with Eigen's. Reported per case: median wall and process-CPU seconds over the
repetitions (after a warm-up call), each configuration in its own process.

Usage (repository root)::

    python benchmarks/cpu_lowering_ops.py --record ops.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

# (name, input [N, H, W, C], kernel shape or pooling window, strides, padding, groups)
CASES: tuple[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, int], Any, int], ...] = (
    ("depthwise 3x3/2, 112x112x96", (32, 112, 112, 96), (3, 3, 1, 96), (2, 2), ((0, 1),) * 2, 96),
    ("depthwise 3x3/1, 56x56x144", (32, 56, 56, 144), (3, 3, 1, 144), (1, 1), ((1, 1),) * 2, 144),
    ("depthwise 5x5/1, 28x28x240", (32, 28, 28, 240), (5, 5, 1, 240), (1, 1), ((2, 2),) * 2, 240),
    ("depthwise 5x5/1, 14x14x672", (32, 14, 14, 672), (5, 5, 1, 672), (1, 1), ((2, 2),) * 2, 672),
    ("1x1, 56x56, 144->24", (32, 56, 56, 144), (1, 1, 144, 24), (1, 1), ((0, 0),) * 2, 1),
    ("1x1, 14x14, 672->112", (32, 14, 14, 672), (1, 1, 672, 112), (1, 1), ((0, 0),) * 2, 1),
    ("1x1/2, 56x56, 64->128", (32, 56, 56, 64), (1, 1, 64, 128), (2, 2), ((0, 0),) * 2, 1),
    ("max-pool 3x3/2, 112x112x64", (32, 112, 112, 64), (3, 3), (2, 2), ((1, 1),) * 2, 0),
)
CONFIGURATIONS = {
    # name: (environment at start-up, CPU lowering when tracing)
    "xla lowering, YNNPACK convolutions": ({"MSAD_JAX_CPU_LOWERING": "0", "XLA_FLAGS": ""}, "0"),
    "xla lowering, Eigen convolutions": (
        {"MSAD_JAX_CPU_LOWERING": "1", "XLA_FLAGS": ""},
        "0",
    ),
    "cpu lowering (default)": ({"MSAD_JAX_CPU_LOWERING": "1", "XLA_FLAGS": ""}, "1"),
}


def _timed(fn, repetitions: int) -> tuple[float, float]:
    """Median wall and process-CPU seconds of ``fn()`` after one warm-up call."""
    fn()
    walls, cpus = [], []
    for _ in range(repetitions):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return float(np.median(walls)), float(np.median(cpus))


def measure(lowering: str, repetitions: int) -> dict[str, dict[str, float]]:
    """Times every case in this process with the CPU lowering ``lowering`` ('0' or '1')."""
    import jax
    import jax.numpy as jnp

    import msad_jax  # noqa: F401 -- sets (or not) the XLA flag before the first computation
    from msad_jax.models import cpu_lowering

    os.environ["MSAD_JAX_CPU_LOWERING"] = lowering
    rng = np.random.default_rng(0)
    out = {}
    for name, x_shape, k_shape, strides, padding, groups in CASES:
        x = jnp.asarray(rng.standard_normal(x_shape, dtype=np.float32))
        if groups == 0:  # max-pooling

            def forward(x, k, window=k_shape, strides=strides, padding=padding):
                return cpu_lowering.max_pool(x, window, strides, padding)

            k = jnp.zeros(())
        else:

            def forward(x, k, strides=strides, padding=padding, groups=groups):
                return cpu_lowering.conv_general_dilated(
                    x,
                    k,
                    strides,
                    padding,
                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                    feature_group_count=groups,
                )

            k = jnp.asarray(rng.standard_normal(k_shape, dtype=np.float32))

        def step(x, k, g, forward=forward):
            y, vjp = jax.vjp(forward, x, k)
            return y, vjp(g)

        g = jnp.asarray(rng.standard_normal(jax.eval_shape(forward, x, k).shape, np.float32))
        jitted = jax.jit(step)
        wall, cpu = _timed(
            lambda jitted=jitted, x=x, k=k, g=g: jax.block_until_ready(jitted(x, k, g)), repetitions
        )
        out[name] = {"wall_s": wall, "cpu_s": cpu}
        print(f"{name}: wall {wall:.4f} s, cpu {cpu:.4f} s", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repetitions", type=int, default=5)
    p.add_argument("--record", default="", help="write the JSON record here")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.repetitions)))
        return
    sys.path.insert(0, HERE)
    import harness

    load_before, start = os.getloadavg(), time.perf_counter()
    results = {}
    for name, (env, lowering) in CONFIGURATIONS.items():
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), f"--child={lowering}",
             f"--repetitions={args.repetitions}"],
            env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
            capture_output=True,
            text=True,
            check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    record = {
        "kind": "ops",
        "command": "python benchmarks/cpu_lowering_ops.py",
        "cases": [
            {"name": c[0], "input": c[1], "kernel_or_window": c[2], "strides": c[3]} for c in CASES
        ],
        "results": results,
        "repetitions": args.repetitions,
        "machine": harness.machine_info(),
        "load_before": list(load_before),
        "load_after": list(os.getloadavg()),
        "seconds": time.perf_counter() - start,
    }
    text = json.dumps(record, indent=1)
    if args.record:
        with open(args.record, "w", encoding="utf-8") as handle:
            handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
