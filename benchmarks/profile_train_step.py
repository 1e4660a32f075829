"""Where the CPU training step spends its time: evidence for benchmarks/RESULTS.md.

Two measurements, each JAX contender in its own process (XLA flags are read at start-up):

``--mode layers``: for ResNet-18's main convolution shapes, the forward convolution, the input
gradient (dx) and the weight gradient (dW) under ``jax.jit`` with YNNPACK's and with Eigen's
convolutions (msad_jax's default), and PyTorch's forward, forward+dx and forward+dW, reported as
GFLOP per second of *process CPU time* (all threads), which is far less sensitive to other jobs on
shared cores than wall time.

``--mode trace``: one training step of msad_jax (``--backbone`` at ``--size``, ``--batch``
images x 2 views, ``--frozen``) under ``jax.profiler`` with ``--xla_cpu_enable_xprof_traceme``,
for msad_jax's default (CPU lowering on) and each ``--variant`` (default: XLA's lowering,
``MSAD_JAX_CPU_LOWERING=0``). The executed XLA:CPU operations are grouped by kind (convolution
forward / input gradient / weight gradient, depthwise convolution parts, matrix products,
max-pool, layout transposes, reductions, elementwise; see :func:`classify`). Eigen runs
convolutions asynchronously and the trace only shows their launch: the stretches of the step
during which no traced operation runs are credited to the convolution or matrix product
launched last (:func:`group_trace`). Operation times overlap on the two cores, so the shares are
what to read. ``--record`` writes the result as JSON.

Usage (repository root)::

    python benchmarks/profile_train_step.py --mode layers
    python benchmarks/profile_train_step.py --mode trace --backbone resnet18 --batch 8
    python benchmarks/profile_train_step.py --mode trace --backbone efficientnet_lite0 \
        --frozen none --batch 8
"""

from __future__ import annotations

import argparse
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

TRACEME = "--xla_cpu_enable_xprof_traceme=true"
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

    import msad_jax  # noqa: F401 -- before any computation: the XLA flag of the CPU lowering

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


# ---------------------------------------------------------------------------------------------
# Trace mode: where one training step's time goes, per kind of operation.

_CONV = re.compile(r"\bconvolution\(.*?window=\{size=(\d+)x(\d+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*?\b([a-z][\w\-]*)\(")
_CALLS = re.compile(r"calls=%([\w.\-]+)")

GROUPS = (
    "convolution, forward",
    "convolution, input gradient",
    "convolution, weight gradient",
    "depthwise convolution, forward (shifted multiply-adds)",
    "depthwise convolution, input gradient",
    "depthwise convolution, weight gradient (per-tap reductions)",
    "matrix products (1x1 convolutions, loss)",
    "max-pool forward and gradient",
    "layout transposes and copies",
    "reductions (BatchNorm parameter gradients, pooling, loss)",
    "elementwise (BatchNorm, ReLU, adds), optimizer, other",
)


def hlo_computations(hlo: str) -> dict[str, list[str]]:
    """Compiled HLO text -> {computation name: its instruction lines}."""
    computations: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header and not line.startswith(" "):
            current = computations.setdefault(header.group(1), [])
        elif line.startswith("}"):
            current = None
        elif current is not None:
            current.append(line)
    return computations


def instruction_texts(hlo: str) -> dict[str, str]:
    """Instruction name -> its line plus the lines of the computations it calls (recursively)."""
    computations = hlo_computations(hlo)
    lines: dict[str, str] = {}
    for body in computations.values():
        for line in body:
            match = _INSTRUCTION.match(line)
            if match:
                lines[match.group(1)] = line

    def expand(line: str, depth: int = 0) -> str:
        parts = [line]
        for name in _CALLS.findall(line) if depth < 4 else ():
            for inner in computations.get(name, ()):
                parts.append(expand(inner, depth + 1))
        return "\n".join(parts)

    return {name: expand(line) for name, line in lines.items()}


def classify(text: str) -> str:
    """The group of :data:`GROUPS` of one executed HLO instruction (with its fused body)."""
    names = " ".join(_OP_NAME.findall(text))
    if "depthwise_conv_weight_gradient" in names:
        return GROUPS[5]
    if "depthwise_conv_input_gradient" in names:
        return GROUPS[4]
    if "depthwise_conv" in names:
        return GROUPS[3]
    rank4 = re.search(r"= \(?[a-z0-9]+\[\d+,\d+,\d+,\d+\]", text.splitlines()[0])
    # XLA:CPU expands select-and-scatter (max-pool's gradient) into a 4-D iota, a reduce-window
    # over (value, index) pairs and a scatter.
    if (
        "max_pool" in names
        or re.search(r"\b(select-and-scatter|scatter|reduce-window)\(", text)
        or (rank4 and re.search(r"\biota\(", text))
    ):
        return GROUPS[7]
    conv = _CONV.search(text)
    if conv:
        # Weight gradients are convolutions whose window is the whole feature map (>= 7x7 at
        # 224x224); forward convolutions keep their name, input gradients are transposes.
        if int(conv.group(1)) >= 7 and "transpose(" not in names and "jvp(" not in names:
            return GROUPS[2]
        return GROUPS[1] if "transpose(" in names else GROUPS[0]
    if re.search(r"\bdot\(", text):
        return GROUPS[6]
    first = text.splitlines()[0]
    if re.search(r"%(transpose|copy)[\w.\-]* =", first) or re.search(
        r"= \S+ (transpose|copy)\(", first
    ):
        return GROUPS[8]
    if re.search(r"\breduce\(", text):
        return GROUPS[9]
    return GROUPS[10]


def group_trace(events: list[dict], texts: dict[str, str]) -> dict[str, float]:
    """Seconds per group in one traced step.

    Synchronous operations count their traced duration. Convolutions and matrix products that
    XLA:CPU runs asynchronously (Eigen, on its thread pool) are traced only while being
    launched; every stretch of the step during which no traced operation runs is therefore
    credited to the asynchronous operation launched last before it.
    """
    ops = sorted(
        (e for e in events if e.get("args", {}).get("hlo_op") and e.get("dur") is not None),
        key=lambda e: e["ts"],
    )
    execute = [e for e in events if e.get("name", "").startswith("ThunkExecutor::Execute")]
    groups = dict.fromkeys(GROUPS, 0.0)
    if not ops:
        return groups
    begin = min(e["ts"] for e in execute) if execute else ops[0]["ts"]
    end = max(e["ts"] + e["dur"] for e in execute) if execute else ops[-1]["ts"]
    covered_until = begin
    last_async = None
    for event in ops:
        text = texts.get(event["args"]["hlo_op"], event["name"])
        group = classify(text)
        if event["ts"] > covered_until and last_async is not None:
            groups[last_async] += (event["ts"] - covered_until) / 1e6
        groups[group] += event["dur"] / 1e6
        covered_until = max(covered_until, event["ts"] + event["dur"])
        if group in GROUPS[:3] + GROUPS[6:7] and event["dur"] < 1000:  # launched, not run
            last_async = group
    if end > covered_until and last_async is not None:
        groups[last_async] += (end - covered_until) / 1e6
    return groups


def trace_step(backbone: str, batch: int, frozen: tuple[str, ...], size: int) -> dict:
    """Traces one pmapped training step (after two warm-up steps); returns the grouped seconds."""
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import harness

    from msad_jax.models import build_backbone, init_variables

    model = build_backbone(backbone)
    variables = init_variables(model, size, 0)
    step, state = harness.jax_msc_step(model, variables, frozen=frozen)
    rng = np.random.default_rng(0)
    data = jax.device_put(
        {
            "view1": rng.standard_normal((1, batch, size, size, 3), dtype=np.float32),
            "view2": rng.standard_normal((1, batch, size, size, 3), dtype=np.float32),
            "mask": np.ones((1, batch), bool),
        }
    )
    center = jnp.asarray(harness.random_center(rng, harness.feature_dim(backbone)))
    for _ in range(2):
        state, metrics = step(state, data, center)
        jax.block_until_ready(metrics)
    texts = instruction_texts(step.lower(state, data, center).compile().as_text())
    with tempfile.TemporaryDirectory() as directory:
        jax.profiler.start_trace(directory, create_perfetto_trace=True)
        wall = time.perf_counter()
        state, metrics = step(state, data, center)
        jax.block_until_ready(metrics)
        wall = time.perf_counter() - wall
        jax.profiler.stop_trace()
        path = glob.glob(os.path.join(directory, "**", "*perfetto_trace.json.gz"), recursive=True)
        with gzip.open(path[0]) as handle:
            trace = json.load(handle)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    shapes = {name: re.search(r"= (\S+)", text).group(1) for name, text in texts.items()}
    top = sorted(
        (e for e in events if e.get("args", {}).get("hlo_op") and e.get("dur") is not None),
        key=lambda e: -e["dur"],
    )[:25]
    return {
        "groups": group_trace(events, texts),
        "step_wall_s": wall,
        "longest_operations": [
            {
                "op": e["args"]["hlo_op"],
                "group": classify(texts.get(e["args"]["hlo_op"], "")),
                "shape": shapes.get(e["args"]["hlo_op"], ""),
                "seconds": e["dur"] / 1e6,
            }
            for e in top
        ],
    }


def run_child(args: argparse.Namespace, mode: str, env: dict[str, str]) -> dict:
    """Runs one measurement in a fresh interpreter with ``env`` added (XLA reads its flags once)."""
    child_env = {**os.environ, "JAX_PLATFORMS": "cpu", **env}
    argv = [sys.executable, os.path.abspath(__file__), f"--mode={mode}", "--child"]
    argv += [f"--{k}={getattr(args, k)}" for k in ("backbone", "batch", "size", "frozen")]
    proc = subprocess.run(argv, env=child_env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def trace_variants(args: argparse.Namespace) -> list[tuple[str, dict[str, str]]]:
    """``(name, environment)`` of the traced contenders: msad_jax's default and ``--variant``s."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import harness

    variants = [("cpu lowering (default)", {"XLA_FLAGS": ""})]
    variants += [
        (name, harness.variant_env(spec))
        for name, _, spec in (v.partition("=") for v in args.variant)
    ]
    for _, env in variants:
        env["XLA_FLAGS"] = f"{env['XLA_FLAGS']} {TRACEME}".strip()
    return variants


def trace_report(args: argparse.Namespace, results: dict[str, dict]) -> list[str]:
    """Markdown table: seconds and share per group, one column pair per contender."""
    names = list(results)
    lines = [
        "| operations | " + " | ".join(f"{n}: s | share" for n in names) + " |",
        "|---|" + "---|---|" * len(names),
    ]
    totals = {n: sum(results[n]["groups"].values()) or 1.0 for n in names}
    for group in GROUPS:
        if not any(results[n]["groups"].get(group, 0.0) > 0 for n in names):
            continue
        cells = []
        for n in names:
            seconds = results[n]["groups"].get(group, 0.0)
            cells.append(f"{seconds:.2f} | {100 * seconds / totals[n]:.0f}%")
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    lines.append(
        "| **step (traced execution)** | "
        + " | ".join(f"{totals[n]:.2f} | 100%" for n in names)
        + " |"
    )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("layers", "trace", "torch_layers"), default="layers")
    p.add_argument("--backbone", default="resnet18", help="trace mode")
    p.add_argument("--batch", type=int, default=8, help="trace mode: images (x2 views)")
    p.add_argument("--size", type=int, default=224, help="trace mode")
    p.add_argument(
        "--frozen", default="default", help="trace mode: 'default', 'none' or regexes (a,b)"
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        help="trace mode: NAME=SPEC, one more contender (XLA flags and VAR=VALUE words); "
        "default: msad_jax's default and 'XLA lowering=MSAD_JAX_CPU_LOWERING=0'",
    )
    p.add_argument("--record", default="", help="trace mode: write the JSON record here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        if args.mode == "trace":
            from train_step_benchmark import frozen_patterns

            from msad_jax.models import backbone_spec

            frozen = frozen_patterns(args.frozen, backbone_spec(args.backbone).frozen)
            result = trace_step(args.backbone, args.batch, frozen, args.size)
        else:
            result = {"layers": jax_layers, "torch_layers": torch_layers}[args.mode]()
        print(json.dumps(result))
        return
    load_before = os.getloadavg()
    print(f"load average before: {load_before}", file=sys.stderr)
    if args.mode == "trace":
        args.variant = args.variant or ["XLA lowering=MSAD_JAX_CPU_LOWERING=0"]
        results = {name: run_child(args, "trace", env) for name, env in trace_variants(args)}
        print(
            f"Training step of {args.backbone}, {args.size}x{args.size}, batch {args.batch} x 2 "
            f"views, frozen {args.frozen}: seconds per kind of operation in one traced step"
        )
        print()
        print("\n".join(trace_report(args, results)))
        if args.record:
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            import harness

            record = {
                "kind": "profile",
                "command": "python " + " ".join(sys.argv),
                "backbone": args.backbone,
                "batch": args.batch,
                "size": args.size,
                "frozen": args.frozen,
                "results": results,
                "machine": harness.machine_info(),
                "load_before": load_before,
                "load_after": os.getloadavg(),
            }
            with open(args.record, "w", encoding="utf-8") as handle:
                json.dump(record, handle, indent=1)
    else:
        runs = {
            "JAX, YNNPACK convolutions": run_child(
                args, "layers", {"XLA_FLAGS": "", "MSAD_JAX_CPU_LOWERING": "0"}
            ),
            "JAX, Eigen convolutions (default)": run_child(args, "layers", {"XLA_FLAGS": ""}),
            "PyTorch (oneDNN)": run_child(args, "torch_layers", {}),
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
