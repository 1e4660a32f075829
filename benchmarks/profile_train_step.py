"""Where the CPU training step spends its time: evidence for benchmarks/RESULTS.md.

Two measurements, each JAX contender in its own process (XLA flags are read at start-up):

``--mode layers``: for ResNet-18's main convolution shapes, the forward convolution, the input
gradient (dx) and the weight gradient (dW) under ``jax.jit``, and PyTorch's forward,
forward+dx and forward+dW, reported as GFLOP per second of *process CPU time* (all threads),
which is far less sensitive to other jobs on shared cores than wall time.

``--mode trace``: one training step of msad_jax (ResNet-18, 224, ``--batch`` images x 2 views)
under ``jax.profiler`` with ``--xla_cpu_enable_xprof_traceme``; the XLA:CPU operations of the
trace are grouped into weight-gradient convolutions, other convolutions, layout transposes,
max-pool (reduce-window / select-and-scatter) and the rest. Convolutions run by Eigen do not
appear in the trace (only YNNPACK fusions do), so use the default flags for this mode.

Usage (repository root)::

    python benchmarks/profile_train_step.py --mode layers
    python benchmarks/profile_train_step.py --mode trace --batch 8
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

EIGEN = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
# (batch, side, in channels, out channels, kernel, stride): ResNet-18 stem, layer1, layer2
# entry (stride 2), layer3 body.
SHAPES = [
    (32, 224, 3, 64, 7, 2),
    (32, 56, 64, 64, 3, 1),
    (32, 56, 64, 128, 3, 2),
    (32, 14, 256, 256, 3, 1),
]


def _timed(fn, repeats: int = 3) -> float:
    """Median process CPU seconds of ``fn`` after one warm-up call."""
    fn()
    cpu = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        cpu.append(time.process_time() - start)
    return float(np.median(cpu))


def jax_layers() -> dict:
    import jax
    import jax.numpy as jnp
    from jax import lax

    rng = np.random.default_rng(0)
    out = {}
    for n, side, cin, cout, k, s in SHAPES:
        x = jnp.asarray(rng.standard_normal((n, side, side, cin), dtype=np.float32))
        w = jnp.asarray(rng.standard_normal((k, k, cin, cout), dtype=np.float32))
        p = k // 2

        def conv(x, w, s=s, p=p):
            return lax.conv_general_dilated(
                x, w, (s, s), ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC")
            )

        g = jnp.ones_like(conv(x, w))
        gflop = 2 * g.size * k * k * cin / 1e9
        fwd = jax.jit(conv)
        dx = jax.jit(lambda x, w, g, conv=conv: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
        dw = jax.jit(lambda x, w, g, conv=conv: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
        out[str((n, side, cin, cout, k, s))] = {
            "fwd": gflop / _timed(lambda fwd=fwd, x=x, w=w: fwd(x, w).block_until_ready()),
            "dx": gflop / _timed(lambda dx=dx, x=x, w=w, g=g: dx(x, w, g).block_until_ready()),
            "dw": gflop / _timed(lambda dw=dw, x=x, w=w, g=g: dw(x, w, g).block_until_ready()),
        }
    return out


def torch_layers() -> dict:
    import torch

    out = {}
    for n, side, cin, cout, k, s in SHAPES:
        x = torch.randn(n, cin, side, side)
        conv = torch.nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
        with torch.no_grad():
            y = conv(x)
        g = torch.ones_like(y)
        gflop = 2 * y.numel() * k * k * cin / 1e9
        xg = x.clone().requires_grad_(True)

        def fwd(conv=conv, x=x):
            with torch.no_grad():
                conv(x)

        def fwd_dx(conv=conv, xg=xg, g=g):
            torch.autograd.grad(conv(xg), xg, g)

        def fwd_dw(conv=conv, x=x, g=g):
            torch.autograd.grad(conv(x), conv.weight, g)

        t_fwd = _timed(fwd)
        out[str((n, side, cin, cout, k, s))] = {
            "fwd": gflop / t_fwd,
            # Subtract the forward pass that autograd needs to get dx / dW alone.
            "dx": gflop / max(_timed(fwd_dx) - t_fwd, 1e-9),
            "dw": gflop / max(_timed(fwd_dw) - t_fwd, 1e-9),
        }
    return out


def trace_step(batch: int) -> dict:
    import jax
    import jax.numpy as jnp

    from msad_jax.models import build_backbone, init_variables
    from msad_jax.optimizer import make_optimizer
    from msad_jax.train_step import (
        create_train_state,
        make_train_step,
        pmap_train_step,
        replicate_state,
    )

    model = build_backbone("resnet18")
    variables = init_variables(model, 224, 0)
    tx = make_optimizer(variables["params"], learning_rate=1e-5, weight_decay=5e-5)
    step = pmap_train_step(make_train_step(model, tx))
    state = replicate_state(create_train_state(variables, tx, jax.random.key(0)))
    rng = np.random.default_rng(0)
    data = jax.device_put(
        {
            "view1": rng.standard_normal((1, batch, 224, 224, 3), dtype=np.float32),
            "view2": rng.standard_normal((1, batch, 224, 224, 3), dtype=np.float32),
            "mask": np.ones((1, batch), bool),
        }
    )
    center = jnp.asarray(rng.standard_normal(512).astype(np.float32) * 0.03)
    for _ in range(2):
        state, metrics = step(state, data, center)
        jax.block_until_ready(metrics)
    hlo = step.lower(state, data, center).compile().as_text()
    shapes = dict(re.findall(r"%([\w.\-]+) = \w+\[([\d,]*)\]", hlo))
    with tempfile.TemporaryDirectory() as directory:
        jax.profiler.start_trace(directory, create_perfetto_trace=True)
        state, metrics = step(state, data, center)
        jax.block_until_ready(metrics)
        jax.profiler.stop_trace()
        path = glob.glob(os.path.join(directory, "**", "*perfetto_trace.json.gz"), recursive=True)
        with gzip.open(path[0]) as handle:
            trace = json.load(handle)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    groups: collections.Counter = collections.Counter()
    for event in events:
        name = event.get("name", "")
        if event.get("ph") != "X" or name.startswith(("$", "Thunk", "Pjit", "Common", "Slinky")):
            continue
        dims = [int(d) for d in shapes.get(name, "").split(",") if d]
        # A weight gradient's output is [Cin, k, k, Cout] (k = 1, 3, 7); activations have
        # 2 x batch rows (ResNet-18 has no 16-channel layer, so the two cannot be confused).
        if (
            name.startswith("ynn_fusion")
            and len(dims) == 4
            and dims[1] == dims[2] < 8
            and dims[0] != 2 * batch
        ):
            group = "convolution, weight gradient (dW)"
        elif name.startswith(("ynn_fusion", "convolution")):
            group = "convolution, forward and input gradient"
        elif name.startswith("transpose"):
            group = "layout transposes"
        elif any(key in name for key in ("iota", "reduce-window", "scatter")):
            group = "max-pool forward/backward"
        else:
            group = "other (BatchNorm, ReLU, adds, loss, optimizer)"
        groups[group] += event.get("dur", 0) / 1e6
    return dict(groups)


def run_child(mode: str, flags: str, batch: int) -> dict:
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [
            sys.executable,
            os.path.abspath(__file__),
            f"--mode={mode}",
            f"--batch={batch}",
            "--child",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("layers", "trace", "torch_layers"), default="layers")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        result = {"layers": jax_layers, "torch_layers": torch_layers}.get(args.mode)
        print(json.dumps(result() if result else trace_step(args.batch)))
        return
    print(f"load average before: {os.getloadavg()}", file=sys.stderr)
    if args.mode == "trace":
        groups = run_child("trace", "--xla_cpu_enable_xprof_traceme=true", args.batch)
        total = sum(groups.values())
        print(f"| operations (batch {args.batch} x 2 views) | seconds in trace | share |")
        print("|---|---|---|")
        for name, seconds in sorted(groups.items(), key=lambda kv: -kv[1]):
            print(f"| {name} | {seconds:.2f} | {100 * seconds / total:.0f}% |")
    else:
        runs = {
            "JAX default (YNNPACK convs)": run_child("layers", "", args.batch),
            "JAX --cpu_eigen_convolutions": run_child("layers", EIGEN, args.batch),
            "PyTorch (oneDNN)": run_child("torch_layers", "", args.batch),
        }
        print("GFLOP per CPU-second (all threads), higher is better")
        print()
        print("| conv (N, side, Cin, Cout, k, stride) | contender | fwd | dx | dW |")
        print("|---|---|---|---|---|")
        for shape in runs["PyTorch (oneDNN)"]:
            for name, result in runs.items():
                r = result[shape]
                print(f"| {shape} | {name} | {r['fwd']:.0f} | {r['dx']:.0f} | {r['dw']:.0f} |")
    print(f"load average after: {os.getloadavg()}", file=sys.stderr)


if __name__ == "__main__":
    main()
