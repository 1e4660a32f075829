"""Vision Transformers beside ResNet-50 on the CPU: forward and MSC-step throughput, memory.

Contenders, one worker process each (runs alternated, compilation excluded and reported
separately; see ``harness.py``): ``resnet50``, ``dinov2_vits14`` and ``vit_base_patch16_224`` by
default, each with random weights (speed does not depend on them) at 224 x 224, float32:

* ``forward``: the features of a batch of ``--batch`` normalised images (jitted ``apply``);
* ``train``: one MSC step of msad_jax (the main job's pmapped step: two views of
  ``--train_batch`` images, SGD, the backbone's default frozen parameters).

Memory, per contender: the peak resident memory of its worker process after compiling and
warming up both tasks (``ru_maxrss``), and XLA's own account of each compiled program (arguments
+ outputs + temporaries, ``compiled.memory_analysis()``), which is what the same program would
need on an accelerator.

Every run writes its raw record to ``benchmarks/results/vit_backbones/<label>.json``; the
Markdown results file ``benchmarks/results/vit_backbones.md`` is regenerated from all records
(``--render_only`` regenerates it without measuring).

Usage (repository root)::

    python benchmarks/vit_backbones.py --label cpu_2core
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import resource
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RECORDS = os.path.join(HERE, "results", "vit_backbones")
RESULTS = os.path.join(HERE, "results", "vit_backbones.md")
TASKS = ("forward", "train")


def _program_bytes(compiled) -> int | None:
    """Arguments + outputs + temporaries of a compiled program, from XLA's memory analysis."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes)


def jax_setup(args: argparse.Namespace):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from msad_jax.models import backbone_spec, build_backbone, init_variables

    spec = backbone_spec(args.backbone)
    model = build_backbone(args.backbone)
    variables = init_variables(model, args.size, seed=0)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((args.batch, args.size, args.size, 3)), jnp.float32)
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    forward_compiled = forward.lower(variables, images).compile()

    def run_forward() -> float:
        return float(jax.block_until_ready(forward_compiled(variables, images))[0, 0])

    n = jax.local_device_count()
    b = args.train_batch // n
    views = rng.standard_normal((2, n, b, args.size, args.size, 3)).astype(np.float32)
    batch = jax.device_put({"view1": views[0], "view2": views[1], "mask": np.ones((n, b), bool)})
    center = jnp.asarray(harness.random_center(rng, model.feature_dim))
    step, state = harness.jax_msc_step(model, variables, frozen=spec.frozen)
    holder = {"state": state}
    step_compiled = step.lower(state, batch, center).compile()

    def run_train() -> float:
        holder["state"], metrics = step_compiled(holder["state"], batch, center)
        return float(jax.block_until_ready(metrics["loss"])[0])

    params = jax.tree.leaves(variables["params"])
    info = {
        "parameters": int(sum(p.size for p in params)),
        "feature_dim": int(model.feature_dim),
        "frozen": list(spec.frozen),
        "program_bytes": {
            "forward": _program_bytes(forward_compiled),
            "train": _program_bytes(step_compiled),
        },
        "backend": jax.default_backend(),
    }

    def peak_rss() -> float:
        # Read after the warm-up calls (harness.serve calls every task before this one).
        info["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return 0.0

    return {"forward": run_forward, "train": run_train, "peak_rss": peak_rss}, info


def contenders(args: argparse.Namespace) -> list[harness.Contender]:
    options = ("batch", "train_batch", "size", "warmup")
    base = harness.forward_flags(args, *options)
    return [
        harness.Contender(
            name,
            harness.worker_argv(__file__, *base, f"--backbone={name}", "--worker=jax"),
            {"XLA_FLAGS": args.xla_flags},
        )
        for name in args.backbones.split(",")
    ]


def record(args: argparse.Namespace, session: harness.Session) -> dict:
    """The raw record of one run (everything the results file is made of)."""
    return {
        "label": args.label,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "machine": harness.machine_info(),
        "settings": {
            "size": args.size,
            "batch": args.batch,
            "train_batch": args.train_batch,
            "repetitions": args.repetitions,
            "dtype": "float32",
        },
        "load_before": session.load_before,
        "load_after": session.load_after,
        "seconds": session.seconds,
        "contenders": {
            name: {
                "info": ready["info"],
                "first_call_s": ready["first_call_s"],
                "tasks": {
                    task: {
                        "calls": m.calls,
                        "wall_s": m.wall_s,
                        "cpu_s": m.cpu_s,
                        "load": m.load,
                    }
                    for (who, task), m in session.measurements.items()
                    if who == name
                },
            }
            for name, ready in session.ready.items()
        },
    }


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f}"


def render(records: list[dict]) -> str:
    """The Markdown results file: one section per record, ratios against the first contender."""
    lines = [
        "# Vision Transformers beside ResNet-50 (CPU)",
        "",
        "Written by `benchmarks/vit_backbones.py` from the raw records in "
        "`benchmarks/results/vit_backbones/`; do not edit by hand. Random weights, float32. "
        "forward: images/s of the jitted features; train: images/s of one MSC step "
        "(each image seen in two views, default frozen parameters). Ratios are against the "
        "first contender's wall time, measured in the same alternated run.",
    ]
    for rec in records:
        s = rec["settings"]
        names = list(rec["contenders"])
        loads = [
            x for c in rec["contenders"].values() for t in c["tasks"].values() for x in t["load"]
        ]
        lines += [
            "",
            f"## {rec['label']} ({rec['date']})",
            "",
            f"- command: `{rec['command']}`",
            f"- machine: {rec['machine']['cpu']}, {rec['machine']['cores']} cores; jax "
            f"{rec['machine']['jax']}, flax {rec['machine']['flax']}",
            f"- {s['size']} x {s['size']} px; forward batch {s['batch']}, "
            f"train batch {s['train_batch']} (x2 views), "
            f"{s['repetitions']} alternated repetitions; 1-min load average at the timed runs: "
            f"median {_median(loads):.2f}, range {min(loads):.2f}-{max(loads):.2f}",
            "",
            "| backbone | params (M) | feature dim | forward img/s | vs first | train img/s | "
            "vs first | first call s after compiling (fwd/train) | peak RSS MiB | "
            "XLA program MiB "
            "(fwd/train) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        base = {
            task: _median(rec["contenders"][names[0]]["tasks"][task]["wall_s"])
            / rec["contenders"][names[0]]["tasks"][task]["calls"]
            for task in TASKS
        }
        for name in names:
            c = rec["contenders"][name]
            per_call = {
                task: _median(c["tasks"][task]["wall_s"]) / c["tasks"][task]["calls"]
                for task in TASKS
            }
            items = {"forward": s["batch"], "train": s["train_batch"]}
            program = c["info"]["program_bytes"]
            lines.append(
                f"| {name} | {c['info']['parameters'] / 1e6:.1f} | {c['info']['feature_dim']} | "
                f"{items['forward'] / per_call['forward']:.2f} | "
                f"{base['forward'] / per_call['forward']:.2f} | "
                f"{items['train'] / per_call['train']:.2f} | "
                f"{base['train'] / per_call['train']:.2f} | "
                f"{c['first_call_s']['forward']:.1f} / {c['first_call_s']['train']:.1f} | "
                f"{_mib(c['info'].get('peak_rss_bytes'))} | "
                f"{_mib(program['forward'])} / {_mib(program['train'])} |"
            )
    return "\n".join(lines) + "\n"


def load_records() -> list[dict]:
    records = []
    for path in sorted(glob.glob(os.path.join(RECORDS, "*.json"))):
        with open(path, encoding="utf-8") as handle:
            records.append(json.load(handle))
    return sorted(records, key=lambda r: r["date"])


def write_results() -> str:
    text = render(load_records())
    with open(RESULTS, "w", encoding="utf-8") as handle:
        handle.write(text)
    return text


def coordinate(args: argparse.Namespace) -> str:
    path = os.path.join(RECORDS, f"{args.label}.json")
    if os.path.exists(path):
        raise SystemExit(f"{path} exists: a finished record is never overwritten; pick a --label.")
    session = harness.alternate(
        contenders(args),
        list(TASKS),
        repetitions=args.repetitions,
        calls={task: args.calls for task in TASKS},
    )
    os.makedirs(RECORDS, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(record(args, session), handle, indent=1)
    return write_results()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", default="resnet50,dinov2_vits14,vit_base_patch16_224")
    p.add_argument("--backbone", default="", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=8, help="images per forward call")
    p.add_argument("--train_batch", type=int, default=4, help="images per MSC step (x2 views)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--label", default="cpu", help="name of the raw record")
    p.add_argument("--render_only", action="store_true", help="only regenerate the results")
    harness.add_common_arguments(
        p,
        repetitions=3,
        calls=1,
        torch_threads=False,
        channels_last=False,
        jax_variants=False,
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.render_only:
        print(write_results())
        return
    harness.dispatch(args, {"jax": jax_setup}, coordinate)


if __name__ == "__main__":
    main()
