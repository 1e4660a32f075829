"""Writes ``benchmarks/results/cpu_training.md`` and the README's CPU table from the raw records.

The records are the JSON files ``cpu_training_speed.py`` writes (``benchmarks/records/
cpu_training/`` by default). Everything in the outputs is computed here from them: medians over
the alternated repetitions, ratios, loads, machine and versions. The README table sits between
the markers ``<!-- cpu-training-table:begin -->`` and ``<!-- cpu-training-table:end -->``.

Usage (repository root)::

    python benchmarks/cpu_training_report.py
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
from collections.abc import Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BEGIN, END = "<!-- cpu-training-table:begin -->", "<!-- cpu-training-table:end -->"
JAX, OLD, TORCH, TORCH_CL = "jax", "jax[xla lowering]", "torch", "torch[channels_last]"


def load_records(directory: str) -> dict[str, dict[str, Any]]:
    """Record name -> record, for every ``*.json`` in ``directory``."""
    records = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
        records[record["name"]] = record
    return records


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def step_stats(record: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per contender: median wall and CPU seconds per step, min, max, first call, first loss."""
    out = {}
    for m in record["measurements"]:
        calls = m["calls"]
        ready = record["contenders"][m["contender"]]["ready"]
        out[m["contender"]] = {
            "wall": _median(m["wall_s"]) / calls,
            "cpu": _median(m["cpu_s"]) / calls,
            "min": min(m["wall_s"]) / calls,
            "max": max(m["wall_s"]) / calls,
            "load": _median(m["load"]),
            "first_call": ready.get("first_call_s", {}).get("step", float("nan")),
            "first_loss": ready.get("first_result", {}).get("step", float("nan")),
            "repetitions": len(m["wall_s"]),
        }
    return out


def ratio(stats: dict[str, dict[str, float]], a: str, b: str, key: str = "wall") -> float:
    """Speed of ``a`` relative to ``b`` (``b``'s time / ``a``'s time)."""
    if a not in stats or b not in stats:
        return float("nan")
    return stats[b][key] / stats[a][key]


def _loads(record: dict[str, Any]) -> list[float]:
    if record["kind"] == "train_step":
        return [x for m in record["measurements"] for x in m["load"]]
    if record["kind"] == "main_run":
        return [r["load"] for side in record["sides"].values() for r in side["runs"]]
    return []


def load_line(record: dict[str, Any]) -> str:
    """Load averages of a record as one Markdown bullet."""
    loads = _loads(record)
    timed = (
        f"; 1-min load at the timed runs: median {_median(loads):.2f}, "
        f"range {min(loads):.2f}-{max(loads):.2f}"
        if loads
        else ""
    )
    return (
        "- load average (1/5/15 min) before: "
        + "/".join(f"{x:.2f}" for x in record["load_before"])
        + ", after: "
        + "/".join(f"{x:.2f}" for x in record["load_after"])
        + timed
        + f"; session {record.get('seconds', float('nan')):.0f} s"
    )


def machine_line(record: dict[str, Any]) -> str:
    """Machine and versions of a record as Markdown bullets."""
    m = record["machine"]
    return (
        f"- machine: {m['cpu']}, {m['cores']} cores; python {m['python']}, jax {m['jax']}, "
        f"jaxlib {m['jaxlib']}, flax {m['flax']}, torch {m['torch']}, "
        f"torchvision {m['torchvision']}"
    )


def step_section(record: dict[str, Any]) -> list[str]:
    """Markdown section of one training-step record."""
    stats = step_stats(record)
    frozen = "nothing frozen" if record["frozen"] == "none" else f"frozen `{record['frozen']}`"
    lines = [
        f"### Training step: {record['backbone']}, {record['size']}x{record['size']}, batch "
        f"{record['batch']} (x2 views), {record['dtype']}, {frozen}",
        "",
        f"- command: `{record['command']}` (record `{record['name']}.json`)",
        machine_line(record),
        load_line(record),
        "- first losses (same weights, views and center on every side): "
        + ", ".join(f"{n} {s['first_loss']:.6f}" for n, s in stats.items()),
        "",
        "| contender | first call s | median s/step (min-max) | img/s | CPU s/step | "
        "vs torch (wall) | vs torch (CPU) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in stats.items():
        lines.append(
            f"| {name} | {s['first_call']:.1f} | {s['wall']:.3f} ({s['min']:.3f}-{s['max']:.3f})"
            f" | {record['images_per_call'] / s['wall']:.2f} | {s['cpu']:.3f} | "
            f"{ratio(stats, name, TORCH):.2f} | {ratio(stats, name, TORCH, 'cpu'):.2f} |"
        )
    lines.append("")
    return lines


def profile_section(record: dict[str, Any]) -> list[str]:
    """Markdown section of one profile record."""
    results = record["results"]
    names = list(results)
    groups: list[str] = []
    for result in results.values():
        groups += [g for g in result["groups"] if g not in groups]
    totals = {n: sum(results[n]["groups"].values()) or 1.0 for n in names}
    lines = [
        f"### Profile: {record['backbone']}, {record['size']}x{record['size']}, batch "
        f"{record['batch']} (x2 views), frozen {record['frozen']}",
        "",
        f"- command: `{record['command']}` (record `{record['name']}.json`)",
        machine_line(record),
        load_line({**record, "kind": "profile"}),
        "",
        "| operations | " + " | ".join(f"{n}: s | share" for n in names) + " |",
        "|---|" + "---|---|" * len(names),
    ]
    for group in groups:
        values = [results[n]["groups"].get(group, 0.0) for n in names]
        if not any(values):
            continue
        cells = [
            f"{v:.2f} | {100 * v / totals[n]:.0f}%" for v, n in zip(values, names, strict=True)
        ]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    lines.append(
        "| **traced step** | " + " | ".join(f"{totals[n]:.2f} | 100%" for n in names) + " |"
    )
    lines.append("")
    return lines


def ops_section(record: dict[str, Any]) -> list[str]:
    """Markdown section of the per-operation record."""
    results = record["results"]
    names = list(results)
    reference = names[0]
    lines = [
        "### Each lowered operation alone: forward + gradients, one jitted call",
        "",
        f"- command: `{record['command']}` (record `{record['name']}.json`); median of "
        f"{record['repetitions']} calls after a warm-up, CPU seconds (all threads)",
        machine_line(record),
        load_line({**record, "kind": "ops"}),
        "",
        "| operation | "
        + " | ".join(f"{n}: CPU s" for n in names)
        + f" | speed-up vs {reference} |",
        "|---|" + "---|" * len(names) + "---|",
    ]
    for case in record["cases"]:
        cpus = [results[n][case["name"]]["cpu_s"] for n in names]
        lines.append(
            f"| {case['name']} | "
            + " | ".join(f"{c:.3f}" for c in cpus)
            + f" | {cpus[0] / cpus[-1]:.1f} |"
        )
    lines.append("")
    return lines


def main_stats(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per side of a main-run record: median wall and CPU seconds, ROC-AUCs."""
    return {
        side: {
            "wall": _median([r["wall_s"] for r in data["runs"]]),
            "cpu": _median([r["cpu_s"] for r in data["runs"]]),
            "walls": [r["wall_s"] for r in data["runs"]],
            "aurocs": [r["auroc_percent"] for r in data["runs"]],
        }
        for side, data in record["sides"].items()
    }


def main_section(record: dict[str, Any]) -> list[str]:
    """Markdown section of one whole-run record (demo or smoke)."""
    stats = main_stats(record)
    lines = [
        f"### Whole run: `{record['config']}`",
        "",
        f"- command: `{record['command']}`, CPU lowering on (default) and off "
        f"(`MSAD_JAX_CPU_LOWERING=0`), alternated (record `{record['name']}.json`)",
        machine_line(record),
        load_line(record),
        "",
        "| lowering | median wall s | runs (wall s) | median CPU s | final ROC-AUC % |",
        "|---|---|---|---|---|",
    ]
    for side, s in stats.items():
        walls = ", ".join(f"{w:.1f}" for w in s["walls"])
        aurocs = ", ".join("n/a" if a is None else f"{a:.2f}" for a in s["aurocs"])
        lines.append(f"| {side} | {s['wall']:.1f} | {walls} | {s['cpu']:.1f} | {aurocs} |")
    lines.append("")
    return lines


def _fmt(x: float) -> str:
    return "n/a" if x != x else f"{x:.2f}"


def summary_table(records: dict[str, dict[str, Any]]) -> list[str]:
    """The README tables: training-step speed vs PyTorch, and whole runs with both lowerings."""
    lines = [
        "| training step, float32, 224x224, two views | msad_jax / PyTorch (CPU time) | "
        "XLA's lowering / PyTorch | msad_jax / PyTorch channels_last | msad_jax / XLA's "
        "lowering | load |",
        "|---|---|---|---|---|---|",
    ]
    for record in records.values():
        if record["kind"] != "train_step":
            continue
        stats = step_stats(record)
        frozen = "" if record["frozen"] == "none" else ", stem + blocks 0-10 frozen"
        label = f"{record['backbone']}, batch {record['batch']}{frozen}"
        lines.append(
            f"| {label} | **{_fmt(ratio(stats, JAX, TORCH))}** "
            f"({_fmt(ratio(stats, JAX, TORCH, 'cpu'))}) | {_fmt(ratio(stats, OLD, TORCH))} | "
            f"{_fmt(ratio(stats, JAX, TORCH_CL))} | {_fmt(ratio(stats, JAX, OLD))} | "
            f"{_median(_loads(record)):.1f} |"
        )
    runs = [r for r in records.values() if r["kind"] == "main_run"]
    if runs:
        lines += [
            "",
            "| whole run (`python -m msad_jax.main`) | CPU lowering (default) | XLA's lowering "
            "| speed-up | final ROC-AUC, default / XLA's | load |",
            "|---|---|---|---|---|---|",
        ]
    for record in runs:
        stats = main_stats(record)
        on, off = stats["cpu lowering"], stats["xla lowering"]
        aurocs = "/".join(
            "n/a" if s["aurocs"][0] is None else f"{s['aurocs'][0]:.2f}%" for s in (on, off)
        )
        lines.append(
            f"| `{record['config']}` | {on['wall']:.0f} s | {off['wall']:.0f} s | "
            f"{_fmt(off['wall'] / on['wall'])} | {aurocs} | {_median(_loads(record)):.1f} |"
        )
    return lines


def earlier_sections(groups: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """Sections of the records kept in sub-folders (earlier measurements, e.g. under more load)."""
    lines: list[str] = []
    for folder, records in groups.items():
        lines += [
            f"## Earlier records: `{folder}/`",
            "",
            "Earlier measurements of the same kind, superseded by the ones above (loads "
            "below); kept for comparison and left out of the summary.",
            "",
        ]
        for record in records.values():
            if record["kind"] == "train_step":
                lines += step_section(record)
    return lines


def results_markdown(
    records: dict[str, dict[str, Any]],
    earlier: dict[str, dict[str, dict[str, Any]]] | None = None,
) -> str:
    """The whole results file: the summary and sections of ``records``, then ``earlier``."""
    lines = [
        "# CPU training speed: msad_jax's CPU lowering, XLA's default lowering, PyTorch",
        "",
        "Written by `benchmarks/cpu_training_report.py` from the records in "
        "`benchmarks/records/cpu_training/` (measured by `benchmarks/cpu_training_speed.py`). "
        "Ratios are speeds (the other side's time / this side's time); > 1 means msad_jax is "
        "faster. `jax` is msad_jax's default on a CPU (CPU lowering on), `jax[xla lowering]` "
        "the same code with `MSAD_JAX_CPU_LOWERING=0`.",
        "",
        "## Summary",
        "",
        *summary_table(records),
        "",
    ]
    kinds = (
        ("train_step", step_section),
        ("profile", profile_section),
        ("ops", ops_section),
        ("main_run", main_section),
    )
    for kind, section in kinds:
        for record in records.values():
            if record["kind"] == kind:
                lines += section(record)
    lines += earlier_sections(earlier or {})
    return "\n".join(lines).rstrip() + "\n"


def update_readme(path: str, table: Sequence[str]) -> bool:
    """Replaces the lines between the README markers with ``table``; False if no markers."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if BEGIN not in text or END not in text:
        return False
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(head + BEGIN + "\n" + "\n".join(table) + "\n" + END + tail)
    return True


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", default=os.path.join(HERE, "records", "cpu_training"))
    p.add_argument("--out", default=os.path.join(HERE, "results", "cpu_training.md"))
    p.add_argument("--readme", default=os.path.join(REPO, "README.md"))
    args = p.parse_args(argv)
    records = load_records(args.records)
    if not records:
        raise SystemExit(f"error: no records in {args.records}; run cpu_training_speed.py first")
    earlier = {
        os.path.basename(os.path.normpath(folder)): load_records(folder)
        for folder in sorted(glob.glob(os.path.join(args.records, "*", "")))
    }
    with open(args.out, "w", encoding="utf-8") as handle:
        handle.write(results_markdown(records, earlier))
    print(f"wrote {args.out}")
    if args.readme and update_readme(args.readme, summary_table(records)):
        print(f"updated the table in {args.readme}")


if __name__ == "__main__":
    main()
