"""JSON records of benchmark runs: provenance, machine load, atomic writes that never overwrite.

A record is one JSON file per finished run. :func:`write_record` writes it atomically and refuses to
replace an existing record that differs in its ``spec`` (what identifies the run); the callers skip
runs whose record exists (:func:`existing_record`), so a finished result is never recomputed or
overwritten by a different run.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import platform
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "lossless_reference_subsets.npz"
PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "numpy",
    "pillow",
    "torch",
    "efficientnet-lite-pytorch",
    "scikit-learn",
)


class RecordMismatchError(RuntimeError):
    """A record exists for this name but describes a different run."""


class LoadSampler:
    """Samples the 1-minute load average every ``period`` seconds in a daemon thread."""

    def __init__(self, period: float = 15.0):
        self.samples: list[tuple[float, float]] = []
        self._period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), os.getloadavg()[0]))
            self._stop.wait(self._period)

    def start(self) -> LoadSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def between(self, start: float, end: float) -> dict[str, float]:
        """Mean/min/max of the samples taken in ``[start, end]`` (or the current value)."""
        values = [v for t, v in self.samples if start <= t <= end] or [os.getloadavg()[0]]
        return {
            "mean": float(np.mean(values)),
            "min": float(np.min(values)),
            "max": float(np.max(values)),
            "samples": len(values),
        }


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


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a run depends on."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit() -> dict[str, Any]:
    """HEAD commit and whether the tracked tree has uncommitted changes (best effort)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return {"commit": head, "dirty": bool(dirty)}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}


def provenance() -> dict[str, Any]:
    """Git commit, package versions and machine of this process."""
    return {
        "git": git_commit(),
        "versions": package_versions(),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        },
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """Parses a record; a damaged file raises ValueError naming it."""
    path = pathlib.Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"Record {path} is damaged ({err}); delete it to run that configuration again."
        ) from None


def existing_record(path: str | os.PathLike, spec: Mapping[str, Any]) -> dict[str, Any] | None:
    """The finished record at ``path`` if there is one; None if not.

    Raises:
      RecordMismatchError: the record describes a run with a different ``spec``.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        return None
    record = read_record(path)
    if record.get("spec") != dict(spec):
        old = record.get("spec") or {}
        changed = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
        raise RecordMismatchError(
            f"Record {path} was made by a different run (differs in {', '.join(changed)}); "
            "move it away or write the new run's records elsewhere."
        )
    return record


def write_record(path: str | os.PathLike, record: Mapping[str, Any]) -> pathlib.Path:
    """Writes ``record`` atomically; an existing record with another ``spec`` is kept.

    Raises:
      RecordMismatchError: a record with a different ``spec`` is already at ``path``.
    """
    path = pathlib.Path(path)
    if "spec" in record:
        existing_record(path, record["spec"])
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(partial, path)
    return path


def apply_overrides(config: Any, overrides: Sequence[str]) -> None:
    """Applies ``key=value`` strings, converting each value to the type of the key's default.

    Raises:
      ValueError: an item that is not ``key=value`` with a known key, or a bad boolean.
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or key not in config:
            raise ValueError(f"--set {item!r}: use key=value with a key of msad_jax.config.")
        current = config[key]
        if isinstance(current, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"--set {item!r}: {key} takes true or false.")
            value: Any = text.lower() in ("true", "1")
        elif isinstance(current, int):
            value = int(text)
        elif isinstance(current, float):
            value = float(text)
        else:
            value = text
        config[key] = value
