"""The demo (``configs/demo.py``) on every digit, under several settings: one JSON record per run.

Each run is exactly the README's command, in a subprocess::

    python -m msad_jax.main --config configs/demo.py --config.normal_class=N --workdir DIR

plus the options of its setting (:data:`SETTINGS`). Two kinds of settings:

- *numerics* settings run the same recipe with different CPU kernels, which round differently (as
  another CPU would): ``default`` (XLA:CPU as installed) and ``eigen_convolutions``
  (``XLA_FLAGS`` set to :data:`EIGEN_CONVOLUTIONS`: convolutions by Eigen instead of
  YNNPACK). Their spread is how much the demo's digits depend on the machine;
- *variant* settings change the recipe (``contrastive``: the standard contrastive loss;
  ``lr_0.01``: a lower learning rate) on a few digits.

Each finished run writes ``benchmarks/results/demo/<setting>/digit_<N>.json``: ROC-AUC, AP and
FPR@95TPR before (epoch 0, pretrained kNN) and after fine-tuning, image counts, wall and CPU time,
peak memory, the load average, the machine and the commit. Existing records are kept (the script
resumes where it stopped); ``--force`` measures again. ``benchmarks/render_results.py`` turns the
records into ``benchmarks/results/demo.md``.

Usage (from the repository root, with the ``efficientnet`` extra installed)::

    nice -n 5 python benchmarks/demo_digits.py --settings default,eigen_convolutions \\
        --workdir runs/demo_digits
    python benchmarks/render_results.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import records  # noqa: E402 -- the benchmarks folder is not a package.

REPO = records.REPO
RECORDS = REPO / "benchmarks" / "results" / "demo"
OUTPUT = REPO / "benchmarks" / "results" / "demo.md"
CONFIG = "configs/demo.py"
DIGITS = tuple(range(10))
# XLA:CPU (jaxlib 0.10) sends convolutions to YNNPACK; without the convolution fusion type they
# go to Eigen. The first records of this setting were taken with the ``--cpu_eigen_convolutions``
# option of ``msad_jax.main`` at their commit, which set ``XLA_FLAGS`` to exactly this value.
EIGEN_CONVOLUTIONS = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


@dataclasses.dataclass(frozen=True)
class Setting:
    """Options added to the demo command.

    Attributes:
      name: folder name of the records.
      options: extra command-line options.
      digits: the digits it runs by default.
      numerics: True if only the CPU kernels differ (same recipe), False for a recipe variant.
      description: one line for the report.
      xla_flags: ``XLA_FLAGS`` of the run ('' = none; an inherited value is dropped).
    """

    name: str
    options: tuple[str, ...]
    digits: tuple[int, ...]
    numerics: bool
    description: str
    xla_flags: str = ""


SETTINGS = {
    s.name: s
    for s in (
        Setting("default", (), DIGITS, True, "XLA:CPU as installed (convolutions by YNNPACK)"),
        Setting(
            "eigen_convolutions",
            (),
            DIGITS,
            True,
            "convolutions by Eigen instead of YNNPACK (other kernels, other rounding); the option "
            "`--cpu_eigen_convolutions` of `msad_jax.main` (commit d1c9a97) puts "
            f"`{EIGEN_CONVOLUTIONS}` in `XLA_FLAGS`: both forms run the same kernels",
            xla_flags=EIGEN_CONVOLUTIONS,
        ),
        Setting(
            "avx2",
            (),
            DIGITS,
            True,
            "XLA's generated code limited to AVX2 (as on a CPU without AVX-512)",
            xla_flags="--xla_cpu_max_isa=AVX2",
        ),
        Setting(
            "contrastive",
            ("--config.loss=contrastive",),
            (4, 8, 9),
            False,
            "the standard contrastive loss (NT-Xent on phi) instead of MSC",
        ),
        Setting(
            "lr_0.01",
            ("--config.learning_rate=0.01",),
            (4, 8),
            False,
            "MSC at learning rate 0.01 instead of the demo's 0.03",
        ),
    )
}


def record_path(setting: str, digit: int, root: pathlib.Path = RECORDS) -> pathlib.Path:
    """Where the record of one run lives."""
    return root / setting / f"digit_{digit}.json"


def demo_command(setting: Setting, digit: int, workdir: pathlib.Path) -> list[str]:
    """The README's demo command for ``digit`` with the setting's options."""
    return [
        sys.executable,
        "-m",
        "msad_jax.main",
        "--config",
        CONFIG,
        f"--config.normal_class={digit}",
        "--workdir",
        str(workdir),
        *setting.options,
    ]


def _metrics(block: dict[str, Any]) -> dict[str, float]:
    return {k: float(block[k]) for k in ("auroc", "average_precision", "fpr_at_95_tpr")}


def run_one(setting: Setting, digit: int, workdir: pathlib.Path) -> dict[str, Any]:
    """Runs the demo once in a fresh ``workdir``; returns its record.

    Raises:
      RuntimeError: the command failed (its log's tail is in the message).
    """
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    argv = demo_command(setting, digit, workdir)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if setting.xla_flags:
        env["XLA_FLAGS"] = setting.xla_flags
    log = workdir / "command.log"
    load_start = records.load_average()
    start = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=handle, stderr=handle)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{records.command_line(argv, ['--workdir'])} exited {code}:\n{tail}")
    report = json.loads((workdir / "report.json").read_text())
    return {
        "setting": setting.name,
        "setting_description": setting.description,
        "digit": digit,
        "command": records.command_line(argv, ["--workdir"]),
        "xla_flags": setting.xla_flags,
        "counts": report["counts"],
        "pretrained": _metrics(report["pretrained"]),
        "final": _metrics(report["final"]),
        "epochs": report["epochs"],
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "load_1min": {"start": load_start, "end": records.load_average()},
        "niceness": os.nice(0),
        "machine": records.machine(),
        "git": records.git_state(),
        "finished": records.timestamp(),
    }


def read_records(root: pathlib.Path = RECORDS) -> list[dict[str, Any]]:
    """Every record under ``root``, ordered by setting (as in :data:`SETTINGS`) and digit."""
    order = {name: i for i, name in enumerate(SETTINGS)}
    found = [records.read_json(p) for p in sorted(root.glob("*/digit_*.json"))]
    return sorted(found, key=lambda r: (order.get(r["setting"], len(order)), r["digit"]))


# --------------------------------------------------------------------------------------------
# The report.


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def _signed(value: float | None) -> str:
    return "" if value is None else f"{100 * value:+.2f}"


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def recorded_options(record: dict[str, Any]) -> str:
    """The options a run added to the demo command, as its record states them."""
    words = record["command"].split()
    after = words.index("--workdir") + 2 if "--workdir" in words else len(words)
    return " ".join(words[after:])


def _by_setting(found: Sequence[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    table: dict[str, dict[int, dict[str, Any]]] = {}
    for record in found:
        table.setdefault(record["setting"], {})[record["digit"]] = record
    return table


def _spread_lines(
    numerics: list[str], table: dict[str, dict[int, dict[str, Any]]], digits: list[int]
) -> list[str]:
    lines = []
    for stage, title in (("pretrained", "pretrained kNN"), ("final", "after fine-tuning")):
        spreads = [
            max(table[s][d][stage]["auroc"] for s in numerics)
            - min(table[s][d][stage]["auroc"] for s in numerics)
            for d in digits
        ]
        means = [_mean([table[s][d][stage]["auroc"] for d in digits]) for s in numerics]
        worst = max(range(len(digits)), key=lambda i: spreads[i])
        lines.append(
            f"- {title}: largest difference on one digit {100 * spreads[worst]:.2f} points "
            f"(digit {digits[worst]}), median {100 * statistics.median(spreads):.2f}; "
            f"digits that differ at all: {sum(s > 0 for s in spreads)} of {len(digits)}; "
            f"means over the {len(digits)} digits "
            + " vs ".join(f"{_pct(m)}% ({s})" for m, s in zip(means, numerics, strict=True))
            + "."
        )
    return lines


def markdown(found: Sequence[dict[str, Any]]) -> str:
    """The demo report from the run records."""
    if not found:
        raise FileNotFoundError("No demo records: run benchmarks/demo_digits.py first.")
    table = _by_setting(found)
    numerics = [s for s in SETTINGS if s in table and SETTINGS[s].numerics]
    variants = [s for s in SETTINGS if s in table and not SETTINGS[s].numerics]
    lines = [
        "# The demo on every digit: `configs/demo.py` under different CPU settings",
        "",
        "Kind: measured. Generated by `python benchmarks/render_results.py` from the per-run "
        "records in `benchmarks/results/demo/<setting>/digit_<N>.json`, written by "
        "`benchmarks/demo_digits.py`. Every run is the README's command",
        "",
        "```",
        f"python -m msad_jax.main --config {CONFIG} --config.normal_class=N --workdir DIR",
        "```",
        "",
        "plus the options and the `XLA_FLAGS` of its setting, as each run's record states them:",
        "",
        "| setting | options | XLA_FLAGS | what differs | runs |",
        "|---|---|---|---|---|",
    ]
    for name in [*numerics, *variants]:
        forms: dict[tuple[str, str], int] = {}
        for record in table[name].values():
            form = (recorded_options(record), record["xla_flags"])
            forms[form] = forms.get(form, 0) + 1
        for (options, xla_flags), count in sorted(forms.items()):
            lines.append(
                f"| `{name}` | {' '.join(f'`{o}`' for o in options.split()) or '--'} | "
                f"{f'`{xla_flags}`' if xla_flags else '--'} | "
                f"{SETTINGS[name].description} | {count} |"
            )
    lines += ["", "## ROC-AUC % per digit (one-class, kNN k = 2)", ""]
    header = ["digit", "train images"]
    for name in numerics:
        header += [f"pretrained ({name})", f"MSC ({name})"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    digits = sorted({d for name in numerics for d in table[name]})
    for digit in digits:
        some = next(table[n][digit] for n in numerics if digit in table[n])
        cells = [str(digit), str(some["counts"]["train"])]
        for name in numerics:
            record = table[name].get(digit)
            cells += [
                _pct(record["pretrained"]["auroc"]) if record else "",
                _pct(record["final"]["auroc"]) if record else "",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    complete = [d for d in digits if all(d in table[n] for n in numerics)]
    if complete:
        cells = ["**mean**", f"({len(complete)} digits)"]
        for name in numerics:
            for stage in ("pretrained", "final"):
                mean = _mean([table[name][d][stage]["auroc"] for d in complete])
                cells.append(f"**{_pct(mean)}**")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "'pretrained' is epoch 0 (kNN on the ImageNet features, before any training); 'MSC' is "
        "the final evaluation after the 20 fine-tuning steps.",
        "",
    ]
    if len(numerics) > 1 and complete:
        lines += [
            f"## How much the numbers depend on the CPU kernels ({', '.join(numerics)})",
            "",
            *_spread_lines(numerics, table, complete),
            "",
        ]
    if variants:
        lines += [
            "## Recipe variants (same command plus one override)",
            "",
            "| digit | pretrained | MSC (default) | "
            + " | ".join(f"{name}" for name in variants)
            + " |",
            "|" + "---|" * (3 + len(variants)),
        ]
        for digit in sorted({d for name in variants for d in table[name]}):
            base = table.get("default", {}).get(digit)
            cells = [
                str(digit),
                _pct(base["pretrained"]["auroc"]) if base else "",
                _pct(base["final"]["auroc"]) if base else "",
            ]
            for name in variants:
                record = table[name].get(digit)
                cells.append(_pct(record["final"]["auroc"]) if record else "")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "## Time and memory",
        "",
        "Per setting, over its runs: wall time of the whole command (start-up, data, weights, "
        "XLA compilation, two evaluations, 20 steps, reports and plots), CPU time (user + "
        "system) and peak resident memory of the process, and the 1-minute load average of the "
        "machine at the start of the runs (other jobs shared the cores: wall times are longer "
        "than on an idle machine, CPU times less so).",
        "",
        "| setting | runs | wall s (median, range) | CPU s (median) | peak MiB (max) | "
        "load at start (range) |",
        "|---|---|---|---|---|---|",
    ]
    for name in [*numerics, *variants]:
        runs = list(table[name].values())
        walls = sorted(r["wall_s"] for r in runs)
        cpus = sorted(r["cpu_s"] for r in runs)
        loads = [r["load_1min"]["start"] for r in runs]
        lines.append(
            f"| `{name}` | {len(runs)} | {statistics.median(walls):.0f} ({walls[0]:.0f}-"
            f"{walls[-1]:.0f}) | {statistics.median(cpus):.0f} | "
            f"{max(r['peak_rss_mib'] for r in runs):.0f} | {min(loads):.1f}-{max(loads):.1f} |"
        )
    machines = sorted(
        {
            json.dumps(
                {k: r["machine"][k] for k in ("cpu", "cores", "isa", "python", "packages")},
                sort_keys=True,
            )
            for r in found
        }
    )
    commits = sorted({r["git"]["commit"][:10] for r in found})
    modified = sorted({f for r in found for f in r["git"]["modified"]})
    lines += ["", "## Machine and code", ""]
    for text in machines:
        m = json.loads(text)
        packages = ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v)
        lines.append(
            f"- {m['cpu']}, {m['cores']} cores, ISA extensions {', '.join(m['isa']) or 'unknown'}; "
            f"Python {m['python']}, {packages}"
        )
    lines.append(
        f"- commit {', '.join(commits)}"
        + (f"; files differing from it: {', '.join(modified)}" if modified else ", clean tree")
    )
    first = min(r["finished"] for r in found)
    last = max(r["finished"] for r in found)
    lines += [f"- runs finished between {first} and {last}", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--settings",
        default="default,eigen_convolutions",
        help=f"comma-separated, from {', '.join(SETTINGS)}",
    )
    parser.add_argument(
        "--digits", default="", help="comma-separated digits (default: each setting's own)"
    )
    parser.add_argument(
        "--workdir", type=pathlib.Path, required=True, help="scratch folder of the runs"
    )
    parser.add_argument("--force", action="store_true", help="measure again over records")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"error: unknown setting(s) {unknown}; choose from {list(SETTINGS)}.")
    chosen = [int(d) for d in args.digits.split(",") if d.strip()] if args.digits else None
    grid = [(SETTINGS[n], d) for n in names for d in (chosen or SETTINGS[n].digits)]
    for i, (setting, digit) in enumerate(grid, start=1):
        path = record_path(setting.name, digit)
        if path.exists() and not args.force:
            print(f"[{i}/{len(grid)}] {setting.name} digit {digit}: recorded, skipped", flush=True)
            continue
        print(
            f"[{i}/{len(grid)}] {setting.name} digit {digit}: running "
            f"(load {records.load_average():.1f})",
            flush=True,
        )
        record = run_one(setting, digit, args.workdir.resolve() / setting.name / str(digit))
        records.write_json(path, record)
        print(
            f"[{i}/{len(grid)}] {setting.name} digit {digit}: "
            f"{_pct(record['pretrained']['auroc'])} -> {_pct(record['final']['auroc'])} "
            f"({record['wall_s']:.0f} s wall, {record['cpu_s']:.0f} s CPU)",
            flush=True,
        )


if __name__ == "__main__":
    main()
