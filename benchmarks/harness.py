"""Side-by-side timing: one worker process per contender, their runs alternated.

Each contender (e.g. "jax", "torch", "jax + an XLA flag") runs in its own Python process, started
with its own environment (XLA flags must be set before JAX starts; PyTorch and XLA thread pools
must not share a process). A worker builds its model and data, runs every task once (the first
call: compilation for JAX, reported separately), runs ``warmup`` more calls, reports ``ready`` and
then waits, idle, on its standard input. The coordinator then asks the workers in turn, one
repetition at a time and in a rotating order, so that slow drifts of the machine's load (other
jobs on shared cores) fall on all contenders alike; the medians over the repetitions and their
ratios are reported. Every repetition records wall time, the worker's process CPU time (all its
threads) and the 1-minute load average.

Protocol (one JSON document per line on the worker's stdout, anything else is ignored):

* worker -> ``{"ready": true, "first_call_s": {task: s}, "first_result": {task: value},
  "setup_s": s, "info": {...}}`` (a task's first return value is kept when it is a number or
  string, e.g. the first loss)
* coordinator -> ``run TASK CALLS`` ; worker -> ``{"wall_s": s, "cpu_s": s}``
* coordinator -> ``quit``

The last section holds what the benchmark scripts share: their common command-line options, the
standard contenders, the layout of their Markdown reports, the worker/coordinator dispatch, and
the inputs and JAX training step they build (JAX and msad_jax are imported inside those
functions only, so that the coordinator stays light).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

Task = Callable[[], Any]
Setup = Callable[[argparse.Namespace], tuple[Mapping[str, Task], Mapping[str, Any]]]


# --------------------------------------------------------------------------------------------
# Worker side.


def _emit(document: Mapping[str, Any]) -> None:
    sys.stdout.write(json.dumps(document) + "\n")
    sys.stdout.flush()


def serve(
    setup: Callable[[], tuple[Mapping[str, Task], Mapping[str, Any]]], *, warmup: int = 1
) -> None:
    """Worker main loop.

    Args:
      setup: builds everything and returns ``(tasks, info)``: each task runs one unit of work and
        must block until it is done (e.g. ``jax.block_until_ready``); ``info`` is reported to the
        coordinator (e.g. the first loss, for a cross-check).
      warmup: calls of each task after the first, before timing starts.
    """
    start = time.perf_counter()
    tasks, info = setup()
    setup_s = time.perf_counter() - start
    first: dict[str, float] = {}
    results: dict[str, Any] = {}
    for name, task in tasks.items():
        t0 = time.perf_counter()
        value = task()
        first[name] = time.perf_counter() - t0
        if isinstance(value, int | float | str):
            results[name] = value
        for _ in range(warmup):
            task()
    _emit(
        {
            "ready": True,
            "first_call_s": first,
            "first_result": results,
            "setup_s": setup_s,
            "info": dict(info),
        }
    )
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "quit":
            return
        if words[0] != "run" or len(words) != 3 or words[1] not in tasks:
            _emit({"error": f"bad command {line.strip()!r}; tasks: {sorted(tasks)}"})
            continue
        task, calls = tasks[words[1]], int(words[2])
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(calls):
            task()
        _emit({"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0})


# --------------------------------------------------------------------------------------------
# Coordinator side.


@dataclasses.dataclass(frozen=True)
class Contender:
    """One side of a comparison.

    Attributes:
      name: label in the tables.
      argv: arguments after the Python interpreter that start its worker.
      env: extra environment variables (e.g. ``XLA_FLAGS``).
    """

    name: str
    argv: Sequence[str]
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)


class Worker:
    """A running worker process."""

    def __init__(self, contender: Contender, *, log_dir: str, timeout_s: float):
        self.contender = contender
        self.timeout_s = timeout_s
        env = {**os.environ, **contender.env}
        safe = "".join(c if c.isalnum() else "_" for c in contender.name)
        self._log = open(os.path.join(log_dir, f"worker_{safe}.log"), "w", encoding="utf-8")  # noqa: SIM115
        self._proc = subprocess.Popen(
            [sys.executable, *contender.argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
            bufsize=1,
        )

    def _read(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            line = line.strip()
            if line.startswith("{"):
                document = json.loads(line)
                if "error" in document:
                    raise RuntimeError(f"{self.contender.name}: {document['error']}")
                return document
        raise RuntimeError(
            f"worker {self.contender.name} exited with {self._proc.wait()}; see {self._log.name}"
        )

    def ready(self) -> dict[str, Any]:
        """Waits for the worker's ready message."""
        return self._read()

    def run(self, task: str, calls: int) -> dict[str, float]:
        """Times ``calls`` calls of ``task``; returns wall and CPU seconds."""
        assert self._proc.stdin is not None
        self._proc.stdin.write(f"run {task} {calls}\n")
        self._proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        """Asks the worker to exit (kills it if it does not)."""
        if self._proc.poll() is None:
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.write("quit\n")
                self._proc.stdin.flush()
                self._proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        self._log.close()


@dataclasses.dataclass
class Measurement:
    """All repetitions of one (contender, task)."""

    contender: str
    task: str
    calls: int
    wall_s: list[float] = dataclasses.field(default_factory=list)
    cpu_s: list[float] = dataclasses.field(default_factory=list)
    load: list[float] = dataclasses.field(default_factory=list)

    @property
    def wall(self) -> float:
        """Median wall seconds per call."""
        return statistics.median(self.wall_s) / self.calls

    @property
    def cpu(self) -> float:
        """Median process CPU seconds per call."""
        return statistics.median(self.cpu_s) / self.calls

    def spread(self) -> tuple[float, float]:
        """Min and max wall seconds per call over the repetitions."""
        return min(self.wall_s) / self.calls, max(self.wall_s) / self.calls


@dataclasses.dataclass
class Session:
    """Results of :func:`alternate`."""

    measurements: dict[tuple[str, str], Measurement]
    ready: dict[str, dict[str, Any]]
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    seconds: float


def alternate(
    contenders: Sequence[Contender],
    tasks: Sequence[str],
    *,
    repetitions: int,
    calls: Mapping[str, int] | None = None,
    cooldown_s: float = 0.5,
    log_dir: str = os.environ.get("BENCHMARK_LOG_DIR", "/tmp"),
    timeout_s: float = 3600.0,
    progress: bool = True,
    parallel_start: bool = False,
) -> Session:
    """Starts the workers one after the other, then alternates their timed repetitions.

    Workers are started sequentially so that one's compilation does not slow another's. Round
    ``r`` visits the contenders in the order rotated by ``r``; between two runs the coordinator
    sleeps ``cooldown_s`` so that spinning worker threads of the previous run go idle.

    Args:
      contenders: the sides to compare.
      tasks: task names every worker serves.
      repetitions: rounds (the median is taken over them).
      calls: calls of each task per repetition (default 1).
      cooldown_s: pause between runs.
      log_dir: where each worker's stderr goes.
      timeout_s: unused safety margin recorded for the caller (workers block on their pipes).
      progress: print one line per run to stderr.
      parallel_start: start (and compile) all workers at once, e.g. on a GPU host whose many
        CPU cores compile in parallel; the timed runs still alternate.

    Returns:
      The :class:`Session`.
    """
    calls = dict(calls or {})
    start = time.perf_counter()
    load_before = os.getloadavg()
    workers: list[Worker] = []
    ready: dict[str, dict[str, Any]] = {}
    measurements: dict[tuple[str, str], Measurement] = {}
    try:
        for contender in contenders:
            workers.append(Worker(contender, log_dir=log_dir, timeout_s=timeout_s))
            if not parallel_start:
                ready[contender.name] = workers[-1].ready()
        for worker in workers:
            name = worker.contender.name
            if name not in ready:
                ready[name] = worker.ready()
            if progress:
                print(f"[ready] {name}: {ready[name]}", file=sys.stderr)
        for task in tasks:
            for c in contenders:
                measurements[(c.name, task)] = Measurement(c.name, task, calls.get(task, 1))
        for rep in range(repetitions):
            for task in tasks:
                order = workers[rep % len(workers) :] + workers[: rep % len(workers)]
                for worker in order:
                    time.sleep(cooldown_s)
                    load = os.getloadavg()[0]
                    out = worker.run(task, calls.get(task, 1))
                    m = measurements[(worker.contender.name, task)]
                    m.wall_s.append(out["wall_s"])
                    m.cpu_s.append(out["cpu_s"])
                    m.load.append(load)
                    if progress:
                        print(
                            f"[{rep + 1}/{repetitions}] {task:>10} {worker.contender.name:>24}: "
                            f"wall {out['wall_s']:.3f}s cpu {out['cpu_s']:.3f}s load {load:.2f}",
                            file=sys.stderr,
                        )
    finally:
        for worker in workers:
            worker.close()
    return Session(
        measurements=measurements,
        ready=ready,
        load_before=load_before,
        load_after=os.getloadavg(),
        seconds=time.perf_counter() - start,
    )


# --------------------------------------------------------------------------------------------
# Reporting.


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 -- absent or broken: say so.
        return "not installed"


def cpu_model() -> str:
    """The processor name from /proc/cpuinfo (or platform's guess)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Machine, versions and the XLA flags of this (coordinator) process."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "jax": _version("jax"),
        "jaxlib": _version("jaxlib"),
        "flax": _version("flax"),
        "torch": _version("torch"),
        "torchvision": _version("torchvision"),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
    }


def machine_lines(info: Mapping[str, Any]) -> list[str]:
    """Markdown bullet lines describing the machine."""
    return [
        f"- machine: {info['cpu']}, {info['cores']} cores (`/proc/cpuinfo`, `os.cpu_count()`)",
        f"- versions: python {info['python']}, jax {info['jax']}, jaxlib {info['jaxlib']}, "
        f"flax {info['flax']}, torch {info['torch']}, torchvision {info['torchvision']}",
    ]


def session_lines(session: Session) -> list[str]:
    """Markdown bullet lines with load averages and duration."""
    loads = [x for m in session.measurements.values() for x in m.load]
    return [
        "- load average (1/5/15 min) before: "
        + "/".join(f"{x:.2f}" for x in session.load_before)
        + ", after: "
        + "/".join(f"{x:.2f}" for x in session.load_after)
        + (
            f"; 1-min load at the timed runs: median {statistics.median(loads):.2f}, "
            f"range {min(loads):.2f}-{max(loads):.2f}"
            if loads
            else ""
        ),
        f"- session wall time: {session.seconds:.0f} s",
    ]


def throughput_table(
    session: Session,
    task: str,
    *,
    items_per_call: int,
    reference: str,
    unit: str = "img/s",
) -> list[str]:
    """Markdown table of one task: per contender wall/CPU per call, throughput, ratio."""
    ref = session.measurements[(reference, task)]
    lines = [
        f"| contender | first call s | median s/call (min-max) | {unit} | CPU s/call | "
        f"ratio vs {reference} (wall) | ratio (CPU) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (name, t), m in session.measurements.items():
        if t != task:
            continue
        lo, hi = m.spread()
        first = session.ready[name]["first_call_s"].get(task, float("nan"))
        lines.append(
            f"| {name} | {first:.1f} | {m.wall:.3f} ({lo:.3f}-{hi:.3f}) | "
            f"{items_per_call / m.wall:.2f} | {m.cpu:.3f} | {ref.wall / m.wall:.2f} | "
            f"{ref.cpu / m.cpu:.2f} |"
        )
    return lines


def session_record(session: Session, contenders: Sequence[Contender]) -> dict[str, Any]:
    """Everything a timed session measured, as a JSON-ready dict (the raw record of a result).

    Holds per contender its environment additions and ready message (first-call seconds, first
    results) and per (contender, task) every repetition's wall and CPU seconds and load; plus
    the load averages, the duration, the machine and the versions.
    """
    return {
        "machine": machine_info(),
        "load_before": list(session.load_before),
        "load_after": list(session.load_after),
        "seconds": session.seconds,
        "contenders": {
            c.name: {"env": dict(c.env), "ready": session.ready.get(c.name, {})} for c in contenders
        },
        "measurements": [dataclasses.asdict(m) for m in session.measurements.values()],
    }


def worker_argv(script: str, *args: str) -> list[str]:
    """``[script, *args]`` with the script's absolute path."""
    return [os.path.abspath(script), *args]


# --------------------------------------------------------------------------------------------
# Building blocks of the benchmark scripts.


def add_common_arguments(
    parser: argparse.ArgumentParser,
    *,
    repetitions: int = 5,
    warmup: int = 1,
    calls: int | None = None,
    calls_help: str = "calls per timed repetition",
    torch_threads: bool = True,
    channels_last: bool = True,
    jax_variants: bool = True,
    replace_out: bool = False,
) -> None:
    """Adds the options every side-by-side benchmark script shares, after its own.

    Options left out get defaults (no JAX variants, no channels_last contender), so that
    :func:`standard_contenders` reads every namespace alike.

    Args:
      parser: the script's parser, its own options already added.
      repetitions: default of ``--repetitions``.
      warmup: default of ``--warmup``.
      calls: default of ``--calls``; None: no such option.
      calls_help: help text of ``--calls``.
      torch_threads: add ``--torch_threads``.
      channels_last: add ``--channels_last`` and ``--torch_channels_last_too``.
      jax_variants: add ``--jax_variant``.
      replace_out: ``--out`` replaces the file (see :func:`dispatch`) instead of appending.
    """
    parser.set_defaults(jax_variant=[], torch_channels_last_too=False)
    parser.add_argument("--repetitions", type=int, default=repetitions)
    if calls is not None:
        parser.add_argument("--calls", type=int, default=calls, help=calls_help)
    parser.add_argument("--warmup", type=int, default=warmup)
    if torch_threads:
        parser.add_argument("--torch_threads", type=int, default=0, help="0 = all cores")
    if channels_last:
        parser.add_argument(
            "--channels_last", action="store_true", help="torch: channels_last layout"
        )
    parser.add_argument("--xla_flags", default=os.environ.get("XLA_FLAGS", ""))
    if jax_variants:
        parser.add_argument(
            "--jax_variant",
            action="append",
            default=[],
            help="NAME=SPEC: one more JAX contender; SPEC holds XLA flags and VAR=VALUE words",
        )
    if channels_last:
        parser.add_argument(
            "--torch_channels_last_too",
            action="store_true",
            help="add a PyTorch contender with channels_last memory format",
        )
    verb = "also write" if replace_out else "append"
    parser.add_argument("--out", default="", help=f"{verb} the Markdown report to this file")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)


def forward_flags(args: argparse.Namespace, *names: str) -> list[str]:
    """The options ``names`` of ``args`` as worker arguments: ``--name=value``, or ``--name``.

    A boolean (a ``store_true`` option) becomes ``--name`` when set and nothing otherwise.
    """
    flags = []
    for name in names:
        value = getattr(args, name)
        if value is True:
            flags.append(f"--{name}")
        elif value is not False:
            flags.append(f"--{name}={value}")
    return flags


def variant_env(spec: str) -> dict[str, str]:
    """The environment of a ``--jax_variant`` spec: its ``VAR=VALUE`` words and its XLA flags.

    Words starting with ``--`` are XLA flags (joined into ``XLA_FLAGS``, empty when there are
    none); a word ``NAME=VALUE`` whose name is an upper-case identifier sets that variable, e.g.
    ``"MSAD_JAX_CPU_CONVOLUTIONS=0 --xla_cpu_use_onednn=true"``.
    """
    env: dict[str, str] = {}
    flags = []
    for word in spec.split():
        name, equals, value = word.partition("=")
        if word.startswith("--"):
            flags.append(word)
        elif equals and name.isidentifier() and name.isupper():
            env[name] = value
        else:
            raise ValueError(f"--jax_variant word {word!r} is neither --XLA_FLAG nor VAR=VALUE")
    return {**env, "XLA_FLAGS": " ".join(flags)}


def standard_contenders(
    script: str,
    base_args: Sequence[str],
    args: argparse.Namespace,
    *,
    jax_env: Mapping[str, str] | None = None,
) -> list[Contender]:
    """``jax``, one ``jax[NAME]`` per ``--jax_variant``, ``torch`` and ``torch[channels_last]``.

    Args:
      script: the benchmark script the workers run (``__file__``).
      base_args: worker arguments both frameworks get (see :func:`forward_flags`).
      args: the coordinator's options (from :func:`add_common_arguments`): ``xla_flags`` for
        ``jax``, ``jax_variant`` (``NAME=SPEC`` each, see :func:`variant_env`),
        ``torch_channels_last_too``.
      jax_env: more environment variables for every JAX worker.

    Returns:
      The contenders, in that order.
    """
    base = worker_argv(script, *base_args)
    extra = dict(jax_env or {})
    variants = [("jax", {"XLA_FLAGS": args.xla_flags})]
    for variant in args.jax_variant:
        name, _, spec = variant.partition("=")
        variants.append((f"jax[{name}]", variant_env(spec)))
    out = [Contender(name, [*base, "--worker=jax"], {**extra, **env}) for name, env in variants]
    out.append(Contender("torch", [*base, "--worker=torch"]))
    if args.torch_channels_last_too:
        out.append(Contender("torch[channels_last]", [*base, "--worker=torch", "--channels_last"]))
    return out


def markdown_report(
    title: str,
    session: Session,
    *,
    notes: Sequence[str] = (),
    body: Sequence[str] = (),
    context: Sequence[str] = (),
) -> str:
    """A script's Markdown report.

    Layout: ``title``; the command line; ``context`` bullets; machine, versions, load and
    duration bullets; ``notes`` bullets; a blank line; ``body`` (tables); a blank line.

    Args:
      title: the heading line.
      session: the timed session (load averages, duration).
      notes: bullets after the machine's.
      body: the lines after the bullets, e.g. :func:`throughput_table`.
      context: bullets right after the command line.
    """
    lines = [
        title,
        "",
        "- command: `python " + " ".join(sys.argv) + "`",
        *context,
        *machine_lines(machine_info()),
        *session_lines(session),
        *notes,
        "",
        *body,
        "",
    ]
    return "\n".join(lines)


def first_results(session: Session, task: str, digits: int) -> str:
    """``"name value, ..."``: each contender's first return value of ``task``."""
    return ", ".join(
        f"{name} {ready['first_result'][task]:.{digits}f}" for name, ready in session.ready.items()
    )


def emit(text: str, out_path: str, *, replace: bool = False) -> None:
    """Prints ``text`` and, if ``out_path`` is set, appends it (or writes it) there as printed."""
    print(text)
    if out_path:
        with open(out_path, "w" if replace else "a", encoding="utf-8") as handle:
            handle.write(text + "\n")


def dispatch(
    args: argparse.Namespace,
    setups: Mapping[str, Setup],
    coordinate: Callable[[argparse.Namespace], str],
    *,
    replace_out: bool = False,
) -> None:
    """A script's main: serve ``--worker``'s setup, or coordinate and emit the report.

    Args:
      args: the script's options (``worker``, ``warmup``, ``out``).
      setups: worker name (``jax``, ``torch``) -> setup building its tasks from ``args``.
      coordinate: runs the comparison under ``args`` and returns the Markdown report.
      replace_out: ``--out`` is overwritten rather than appended to.
    """
    if args.worker:
        if args.worker not in setups:
            raise ValueError(f"unknown --worker {args.worker!r}; use one of {sorted(setups)}")
        setup = setups[args.worker]
        serve(lambda: setup(args), warmup=args.warmup)
        return
    emit(coordinate(args), args.out, replace=replace_out)


def feature_dim(backbone: str) -> int:
    """Pooled feature size: 512 (ResNet-18/34), 1280 (EfficientNet-Lite) or 2048."""
    if backbone.startswith("efficientnet_lite"):
        return 1280
    return 512 if backbone in ("resnet18", "resnet34") else 2048


def random_center(rng: np.random.Generator, dim: int, norm: float = 0.6) -> np.ndarray:
    """A random float32 center of norm ``norm`` (about what training data gives)."""
    center = rng.standard_normal(dim).astype(np.float32)
    center *= norm / np.linalg.norm(center)
    return center


def make_images(n: int, side: int, seed: int = 0) -> np.ndarray:
    """Smooth random uint8 images (upsampled noise), ``[n, side, side, 3]``."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, side // 4 + 1, side // 4 + 1, 3)).astype(np.float32)
    fine = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)[:, :side, :side]
    return fine.astype(np.uint8)


def jax_msc_step(
    model: Any,
    variables: dict[str, Any],
    *,
    frozen: Sequence[str] = (),
    augment_fn: Callable[..., Any] | None = None,
) -> tuple[Callable[..., Any], Any]:
    """msad_jax's pmapped MSC step and its replicated initial state (the main job's step).

    SGD with learning rate 1e-5, weight decay 5e-5 and no momentum, like
    :class:`torch_reference.MSCStep`.

    Args:
      model: the Flax backbone.
      variables: its ``{'params', 'batch_stats'}``.
      frozen: frozen parameter patterns.
      augment_fn: fused on-device augmentation (the step then takes image batches), or None.

    Returns:
      ``(step, state)``: ``step(state, batch, center) -> (state, metrics)``.
    """
    import jax

    from msad_jax.optimizer import make_optimizer
    from msad_jax.train_step import (
        create_train_state,
        make_train_step,
        pmap_train_step,
        replicate_state,
    )

    tx = make_optimizer(variables["params"], learning_rate=1e-5, weight_decay=5e-5, frozen=frozen)
    step = pmap_train_step(make_train_step(model, tx, frozen=frozen, augment_fn=augment_fn))
    state = replicate_state(create_train_state(variables, tx, jax.random.key(0)))
    return step, state
