"""Benchmark: msad_jax.knn.knn_scores vs faiss-cpu IndexFlatL2 vs scikit-learn NearestNeighbors.

All three compute the same thing: for every query, the sum of squared L2 distances to its k = 2
nearest gallery rows (exact). Data: random unit-norm float32 rows (like the phi features).

Timing: one fresh subprocess per (gallery, queries, dim). Each method is called once to warm up
(for JAX this includes compilation; reported as "first call"), then ``--repeats`` rounds call every
method once per round, in a rotating order (alternating runs), and the median wall time is
reported, with the ratio of median process CPU times (all threads) as a second view that is less
sensitive to other jobs on a shared machine. Every call starts from NumPy arrays and ends with a
NumPy array of scores, so transfer, index building (faiss ``add``, sklearn ``fit``) and the final
sum are included for everyone.

Peak memory: one fresh subprocess per (size, method), run with ``MALLOC_MMAP_THRESHOLD_=131072``
(glibc then maps every allocation of 128 KiB or more separately and unmaps it on free, so a warm
call cannot reuse memory kept from an earlier call unseen). After the data exist, the kernel's
peak-RSS counter is reset (``echo 5 > /proc/self/clear_refs``), the method runs, and
``VmHWM - VmRSS`` (from ``/proc/self/status``, sampled right before the run) is the extra peak
resident memory of that call: working buffers, copies of the gallery, and (first call) JIT
compilation. It is measured on the first call and again on a second call (warm); for jax also on
a warm call whose inputs are already JAX arrays.

Usage (from the repository root):
  python benchmarks/knn_benchmark.py --output benchmarks/results/knn   # writes knn.json and knn.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

METHODS = ("jax", "faiss", "sklearn")


def make_data(n_gallery: int, n_queries: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    gallery = rng.standard_normal((n_gallery, dim), dtype=np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = rng.standard_normal((n_queries, dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return gallery, queries


def make_runner(method: str, budget_bytes: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    if method == "jax":
        from msad_jax.knn import knn_scores

        def run_jax(gallery, queries):
            return np.asarray(knn_scores(gallery, queries, 2, memory_budget_bytes=budget_bytes))

        return run_jax
    if method == "faiss":
        import faiss

        def run_faiss(gallery, queries):
            index = faiss.IndexFlatL2(gallery.shape[1])
            index.add(gallery)
            distances, _ = index.search(queries, 2)
            return distances.sum(axis=1)

        return run_faiss
    if method == "sklearn":
        from sklearn.neighbors import NearestNeighbors

        def run_sklearn(gallery, queries):
            nn = NearestNeighbors(n_neighbors=2, algorithm="brute", metric="sqeuclidean")
            distances, _ = nn.fit(gallery).kneighbors(queries)
            return distances.sum(axis=1)

        return run_sklearn
    raise ValueError(f"unknown method {method!r}; use one of {METHODS}")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{field} not found in /proc/self/status")
    return int(match.group(1))


def _extra_peak_mib(fn: Callable[[], object]) -> float:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def worker_time(args) -> dict:
    gallery, queries = make_data(args.gallery, args.queries, args.dim)
    runners = {m: make_runner(m, args.budget_mib << 20) for m in args.methods}
    first, results = {}, {}
    for m, run in runners.items():
        t = time.perf_counter()
        results[m] = run(gallery, queries)
        first[m] = time.perf_counter() - t
    times = {m: [] for m in runners}
    cpu_times = {m: [] for m in runners}
    names = list(runners)
    for r in range(args.repeats):
        for m in names[r % len(names) :] + names[: r % len(names)]:
            t, c = time.perf_counter(), time.process_time()
            runners[m](gallery, queries)
            times[m].append(time.perf_counter() - t)
            cpu_times[m].append(time.process_time() - c)
    ref = results.get("faiss", next(iter(results.values())))
    return {
        "first_s": first,
        "times_s": times,
        "median_s": {m: statistics.median(v) for m, v in times.items()},
        "cpu_times_s": cpu_times,
        "median_cpu_s": {m: statistics.median(v) for m, v in cpu_times.items()},
        "max_abs_diff_vs_faiss": {m: float(np.max(np.abs(v - ref))) for m, v in results.items()},
    }


def worker_memory(args) -> dict:
    gallery, queries = make_data(args.gallery, args.queries, args.dim)
    (method,) = args.methods
    run = make_runner(method, args.budget_mib << 20)
    out = {
        "first_mib": _extra_peak_mib(lambda: run(gallery, queries)),
        "warm_mib": _extra_peak_mib(lambda: run(gallery, queries)),
    }
    if method == "jax":
        import jax

        from msad_jax.knn import knn_scores, plan_scoring

        budget = args.budget_mib << 20
        on_device = jax.block_until_ready((jax.device_put(gallery), jax.device_put(queries)))
        out["device_inputs_mib"] = _extra_peak_mib(
            lambda: np.asarray(knn_scores(*on_device, 2, memory_budget_bytes=budget))
        )
        plan = plan_scoring(args.queries, args.gallery, args.dim, 2, memory_budget_bytes=budget)
        out["plan"] = dataclasses.asdict(plan)
    return out


def _spawn(mode: str, gallery: int, queries: int, dim: int, methods, args) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        mode,
        "--gallery",
        str(gallery),
        "--queries",
        str(queries),
        "--dims",
        str(dim),
        "--repeats",
        str(args.repeats),
        "--budget-mib",
        str(args.budget_mib),
        "--methods",
        *methods,
    ]
    env = dict(os.environ)
    if mode == "memory":
        # Every allocation of 128 KiB or more gets its own mapping and is returned to the OS when
        # freed, so a warm call's peak is not hidden by memory the allocator kept from before.
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def _versions() -> str:
    import faiss
    import jax
    import sklearn

    return (
        f"jax {jax.__version__}, faiss {faiss.__version__}, scikit-learn {sklearn.__version__}, "
        f"numpy {np.__version__}, Python {platform.python_version()}"
    )


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        model = re.search(r"model name\s*:\s*(.*)", text).group(1)
    except (OSError, AttributeError):
        model = platform.processor()
    return f"{model}, {os.cpu_count()} logical CPUs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gallery", type=int, nargs="+", default=[5000, 50000])
    parser.add_argument("--queries", type=int, default=10000)
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--budget-mib", type=int, default=256, help="knn_scores memory budget")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory workers")
    parser.add_argument("--output", help="also write <output>.json (the record) and <output>.md")
    parser.add_argument("--worker", choices=["time", "memory"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        args.gallery, args.dim = args.gallery[0], args.dims[0]
        result = worker_time(args) if args.worker == "time" else worker_memory(args)
        print(json.dumps(result))
        return

    command = "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:])
    document = {
        "command": command,
        "machine": _cpu(),
        "versions": _versions(),
        "load_start": _loadavg(),
        "budget_mib": args.budget_mib,
        "repeats": args.repeats,
        "rows": [],
    }
    for dim in args.dims:
        for gallery in args.gallery:
            load_before = _loadavg()
            timing = _spawn("time", gallery, args.queries, dim, args.methods, args)
            memory = {}
            if not args.no_memory:
                for m in args.methods:
                    memory[m] = _spawn("memory", gallery, args.queries, dim, [m], args)
            document["rows"].append(
                {
                    "gallery": gallery,
                    "queries": args.queries,
                    "dim": dim,
                    "load_before": load_before,
                    "load_after": _loadavg(),
                    "timing": timing,
                    "memory": memory,
                }
            )
            print(table_row(document["rows"][-1]), flush=True)
    document["load_end"] = _loadavg()
    text = markdown(document)
    print(text)
    if args.output:
        output = pathlib.Path(args.output).with_suffix("")
        output.with_suffix(".json").write_text(json.dumps(document, indent=1) + "\n")
        output.with_suffix(".md").write_text(text)


TABLE_HEADER = (
    "| gallery | queries | dim | jax s | faiss s | sklearn s | jax/faiss | jax/faiss CPU time "
    "| jax first call s "
    "| peak extra MiB jax (first / warm / device inputs) | jax plan MiB | faiss | sklearn "
    "| max abs diff vs faiss (jax / sklearn) |"
)


def table_row(raw: dict) -> str:
    """One Markdown table row of a measured (gallery, queries, dim) record."""
    timing, memory = raw["timing"], raw["memory"]
    med = timing["median_s"]

    def fmt(m):
        return f"{med[m]:.2f}" if m in med else "-"

    def mem(m):
        if m not in memory:
            return "-"
        values = [memory[m]["first_mib"], memory[m]["warm_mib"]]
        values += [memory[m]["device_inputs_mib"]] if m == "jax" else []
        return " / ".join(f"{v:.0f}" for v in values)

    plan = memory.get("jax", {}).get("plan")
    plan_mib = f"{plan['work_bytes'] / 2**20:.0f}" if plan else "-"
    both = {"jax", "faiss"} <= set(med)
    ratio = f"{med['jax'] / med['faiss']:.2f}" if both else "-"
    cpu = timing["median_cpu_s"]
    cpu_ratio = f"{cpu['jax'] / cpu['faiss']:.2f}" if both else "-"
    diffs = timing["max_abs_diff_vs_faiss"]
    diff = " / ".join(f"{diffs[m]:.1e}" for m in ("jax", "sklearn") if m in diffs)
    row = [
        str(raw["gallery"]),
        str(raw["queries"]),
        str(raw["dim"]),
        fmt("jax"),
        fmt("faiss"),
        fmt("sklearn"),
        ratio,
        cpu_ratio,
        f"{timing['first_s'].get('jax', float('nan')):.2f}",
        mem("jax"),
        plan_mib,
        mem("faiss"),
        mem("sklearn"),
        diff,
    ]
    return "| " + " | ".join(row) + " |"


def markdown(document: dict) -> str:
    """The results page of a benchmark record (``--output`` writes both)."""
    lines = [
        "# kNN scoring benchmark (k = 2, exact, float32)",
        "",
        "Kind: measured. Generated by `python benchmarks/render_results.py` from the record "
        f"beside this file (.json), written by `{document['command']}`.",
        "",
        f"Machine: {document['machine']}. {document['versions']}.",
        f"Load average (1/5/15 min) at start: {document['load_start']}.",
        f"knn_scores memory budget: {document['budget_mib']} MiB. Repeats: "
        f"{document['repeats']} (alternating order, median).",
        "",
        TABLE_HEADER,
        "|" + "---:|" * 14,
        *[table_row(raw) for raw in document["rows"]],
        "",
        f"Load average at end: {document['load_end']}.",
        "",
        "Peak extra MiB: growth of the peak resident set (VmHWM) during one call over the resident "
        "set just before it, with the NumPy data already in memory; first / warm call (faiss and "
        "sklearn columns too). For jax, the first call includes compilation, and calls from NumPy "
        "include copying the gallery and queries into XLA buffers; 'device inputs' is a warm call "
        "on arrays already placed with jax.device_put (the usual case: features come from the "
        "model on device). 'jax plan MiB' is the working-buffer estimate knn_scores sizes its "
        "chunks with (memory budget above). faiss keeps a copy of the gallery in its index.",
        "",
    ]
    if document.get("notes"):
        lines += ["Notes:", "", *[f"- {note}" for note in document["notes"]], ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
