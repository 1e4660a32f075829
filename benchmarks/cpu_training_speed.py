"""CPU training speed, msad_jax's CPU lowering vs XLA's default lowering vs PyTorch: raw records.

One command measures everything ``benchmarks/results/cpu_training.md`` and the README's
performance table report, and writes one JSON record per measurement into ``--records``
(``benchmarks/records/cpu_training/`` by default); ``cpu_training_report.py`` then turns the
records into the results file and the README table. Run it on an otherwise idle machine::

    python benchmarks/cpu_training_speed.py && python benchmarks/cpu_training_report.py

Measurements (``--only NAME,...`` picks some, ``--list`` lists them):

* ``step_*``: the MSC training step at 224x224, side by side (``train_step_benchmark.py``'s
  workers, alternated repetitions; see ``harness.py``): ``jax`` is msad_jax as it runs by
  default (CPU lowering on), ``jax[xla lowering]`` the same code with
  ``MSAD_JAX_CPU_LOWERING=0`` (XLA's default lowering, what msad_jax ran before), ``torch`` the
  plain PyTorch step of ``torch_reference.py`` (NCHW) and ``torch[channels_last]``. ResNet-18
  and EfficientNet-Lite0 at batch 32 (64 views per step); Lite0 also with its stem and blocks
  0-10 frozen (the demo's and the long CIFAR-10 benchmark's setting) and at batch 16. The
  workers stay alive side by side: all-trained Lite0 at batch 32 holds about 6 GB per JAX
  process, so that run leaves out ``torch[channels_last]``.
* ``profile_*``: where one step's time goes per kind of operation, both lowerings
  (``profile_train_step.py --mode trace``).
* ``ops``: each operation the CPU lowering replaces, alone, forward and gradients, with both
  lowerings (``cpu_lowering_ops.py``).
* ``demo`` and ``smoke``: wall time of the whole ``python -m msad_jax.main`` run of
  ``configs/demo.py`` and ``configs/smoke.py`` with the CPU lowering on and off, alternated, each
  in a fresh working directory; also the final ROC-AUC of each run.

An existing record is never overwritten: move it away (or pass another ``--records``) to
measure again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import harness  # noqa: E402
import train_step_benchmark  # noqa: E402

LITE0_FROZEN = r"^_conv_stem/,^_bn0/,^_blocks/([0-9]|10)/"
XLA_LOWERING = "xla lowering=MSAD_JAX_CPU_LOWERING=0"


@dataclasses.dataclass(frozen=True)
class StepRun:
    """One side-by-side training-step measurement.

    Attributes:
      name: record name.
      backbone: registry name.
      batch: images per step (two views each).
      frozen: ``train_step_benchmark.py --frozen`` value.
      xla_lowering: add the ``jax[xla lowering]`` contender.
      channels_last: add the ``torch[channels_last]`` contender.
      repetitions: timed rounds.
    """

    name: str
    backbone: str
    batch: int
    frozen: str = "none"
    xla_lowering: bool = True
    channels_last: bool = True
    repetitions: int = 5

    def argv(self) -> list[str]:
        """``train_step_benchmark.py`` options of this run."""
        argv = [
            f"--backbone={self.backbone}",
            f"--batch={self.batch}",
            "--size=224",
            f"--frozen={self.frozen}",
            f"--repetitions={self.repetitions}",
            "--xla_flags=",
        ]
        if self.xla_lowering:
            argv.append(f"--jax_variant={XLA_LOWERING}")
        if self.channels_last:
            argv.append("--torch_channels_last_too")
        return argv


STEP_RUNS = (
    StepRun("step_resnet18_b32", "resnet18", 32),
    StepRun("step_lite0_b32", "efficientnet_lite0", 32, channels_last=False),
    StepRun("step_lite0_b32_frozen0-10", "efficientnet_lite0", 32, frozen=LITE0_FROZEN),
    StepRun("step_lite0_b16", "efficientnet_lite0", 16, channels_last=False, repetitions=3),
)
PROFILE_RUNS = {
    "profile_resnet18_b8": ["--backbone=resnet18", "--batch=8"],
    "profile_lite0_b8": ["--backbone=efficientnet_lite0", "--batch=8", "--frozen=none"],
}
MAIN_RUNS = {"demo": ("configs/demo.py", 2), "smoke": ("configs/smoke.py", 3)}


def run_ops() -> dict[str, Any]:
    """Runs ``cpu_lowering_ops.py`` (each lowered operation alone); returns its record."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "record.json")
        command = [sys.executable, os.path.join(HERE, "cpu_lowering_ops.py"), f"--record={path}"]
        subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)


def run_step(run: StepRun) -> dict[str, Any]:
    """Times one :class:`StepRun`; returns its record."""
    args = train_step_benchmark.parse(run.argv())
    contenders = train_step_benchmark.contenders(args)
    session = harness.alternate(
        contenders, ["step"], repetitions=args.repetitions, calls={"step": args.calls}
    )
    return {
        "kind": "train_step",
        "backbone": run.backbone,
        "batch": run.batch,
        "size": 224,
        "frozen": run.frozen,
        "dtype": "float32",
        "images_per_call": run.batch,
        "reference": "torch",
        "command": "python benchmarks/train_step_benchmark.py " + " ".join(run.argv()),
        **harness.session_record(session, contenders),
    }


def run_profile(argv: Sequence[str]) -> dict[str, Any]:
    """Runs ``profile_train_step.py --mode trace`` (both lowerings); returns its record."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "record.json")
        command = [
            sys.executable,
            os.path.join(HERE, "profile_train_step.py"),
            "--mode=trace",
            *argv,
            f"--variant={XLA_LOWERING}",
            f"--record={path}",
        ]
        subprocess.run(command, check=True, cwd=REPO)
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    # The command as anyone reruns it from the repository root (no paths of this run).
    shown = ["python benchmarks/profile_train_step.py", *command[2:-1]]
    record["command"] = " ".join(shown)
    return record


_AUROC = re.compile(r"done: ROC-AUC ([\d.]+)%")


def _time_main(config: str, env: dict[str, str], workdir: str) -> dict[str, Any]:
    """One ``python -m msad_jax.main`` run: wall and CPU seconds, exit status, final ROC-AUC."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "msad_jax.main", f"--config={config}", f"--workdir={workdir}"],
        env={**os.environ, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{config} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    match = _AUROC.search(proc.stderr)
    return {
        "wall_s": wall,
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "load": load,
        "auroc_percent": float(match.group(1)) if match else None,
    }


def run_main(name: str, config: str, repetitions: int) -> dict[str, Any]:
    """Alternates whole main-job runs with the CPU lowering on and off; returns the record."""
    sides = {
        "cpu lowering": {"MSAD_JAX_CPU_LOWERING": "1"},
        "xla lowering": {"MSAD_JAX_CPU_LOWERING": "0"},
    }
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    load_before, start = os.getloadavg(), time.perf_counter()
    root = tempfile.mkdtemp(prefix=f"msad_{name}_")
    try:
        for rep in range(repetitions):
            order = list(sides) if rep % 2 == 0 else list(sides)[::-1]
            for side in order:
                workdir = os.path.join(root, f"{side.replace(' ', '_')}_{rep}")
                result = _time_main(config, sides[side], workdir)
                runs[side].append(result)
                print(f"[{name} {rep + 1}/{repetitions}] {side}: {result}", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "kind": "main_run",
        "config": config,
        "command": f"python -m msad_jax.main --config {config} --workdir <fresh folder>",
        "machine": harness.machine_info(),
        "load_before": list(load_before),
        "load_after": list(os.getloadavg()),
        "seconds": time.perf_counter() - start,
        "sides": {side: {"env": sides[side], "runs": runs[side]} for side in sides},
    }


def measurements() -> dict[str, Callable[[], dict[str, Any]]]:
    """Record name -> function that measures it, in the order they run."""
    table: dict[str, Callable[[], dict[str, Any]]] = {}
    for run in STEP_RUNS:
        table[run.name] = lambda run=run: run_step(run)
    for name, argv in PROFILE_RUNS.items():
        table[name] = lambda argv=argv: run_profile(argv)
    table["ops"] = run_ops
    for name, (config, repetitions) in MAIN_RUNS.items():
        table[name] = lambda n=name, c=config, r=repetitions: run_main(n, c, r)
    return table


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", default=os.path.join(HERE, "records", "cpu_training"))
    p.add_argument("--only", default="", help="comma-separated record names (default: all)")
    p.add_argument("--list", action="store_true", help="list the record names and exit")
    args = p.parse_args(argv)
    table = measurements()
    if args.list:
        print("\n".join(table))
        return
    names = [n for n in args.only.split(",") if n] or list(table)
    unknown = sorted(set(names) - set(table))
    if unknown:
        raise SystemExit(f"error: unknown --only {unknown}; choose from {list(table)}")
    os.makedirs(args.records, exist_ok=True)
    failed: list[str] = []
    for name in names:
        path = os.path.join(args.records, f"{name}.json")
        if os.path.exists(path):
            print(f"{path} exists: kept (move it away to measure again)", file=sys.stderr)
            continue
        print(f"== {name} (load {os.getloadavg()[0]:.2f})", file=sys.stderr)
        try:
            record = {"name": name, **table[name]()}
        except (
            RuntimeError,
            subprocess.CalledProcessError,
        ) as err:  # e.g. a worker ran out of memory
            failed.append(name)
            print(f"{name} failed, no record written: {err}", file=sys.stderr)
            continue
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=1)
        os.replace(tmp, path)
        print(f"wrote {path}", file=sys.stderr)
    if failed:
        raise SystemExit(f"error: no record for {failed}; see the messages above")


if __name__ == "__main__":
    main()
