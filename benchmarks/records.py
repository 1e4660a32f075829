"""Raw benchmark records: one JSON file per measurement, with where and how it was taken.

Every results file under ``benchmarks/results/`` is generated from such records by a committed
script (``benchmarks/render_results.py`` regenerates them all). This module holds what the
record-writing scripts share:

- :func:`machine`: the CPU model, core count, instruction-set extensions, OS and package versions;
- :func:`git_state`: the commit the code ran at and the tracked files that differed from it;
- :func:`portable` / :func:`command_line`: paths and commands as they can be published (paths
  inside the repository relative to it, other paths by their file name only);
- :func:`write_json` / :func:`read_json`: records written atomically (a killed run leaves the
  previous file or none, never half a file).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

REPO = pathlib.Path(__file__).resolve().parent.parent

# Instruction-set extensions that change which CPU kernels XLA, Eigen and YNNPACK pick.
ISA_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")

PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else :func:`platform.processor`)."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_isa() -> list[str]:
    """Which of :data:`ISA_FLAGS` the CPU reports (Linux; empty elsewhere)."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            return [flag for flag in ISA_FLAGS if flag in present]
    return []


def versions(packages: Iterable[str] = PACKAGES) -> dict[str, str]:
    """Installed versions of ``packages`` ('' when missing)."""
    found = {}
    for name in packages:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = ""
    return found


def machine(packages: Iterable[str] = PACKAGES) -> dict[str, Any]:
    """Where a measurement ran: CPU, cores, ISA extensions, OS, Python and package versions."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "isa": cpu_isa(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "packages": versions(packages),
    }


OUTPUTS = "benchmarks/results/"


def git_state(repo: pathlib.Path = REPO) -> dict[str, Any]:
    """``{'commit': full hash, 'modified': tracked files differing from it}`` (best effort).

    Untracked files are not listed (the benchmark scripts import the package from the
    repository), nor files under :data:`OUTPUTS`, which the scripts themselves write.
    """
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        diff = subprocess.run(
            ["git", "diff", "--name-only", "HEAD"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "modified": []}
    return {"commit": commit, "modified": sorted(f for f in diff if not f.startswith(OUTPUTS))}


def portable(path: str | os.PathLike, repo: pathlib.Path = REPO) -> str:
    """``path`` as it can be published: relative to ``repo`` if inside it, else its name."""
    resolved = pathlib.Path(path).resolve()
    try:
        return resolved.relative_to(repo.resolve()).as_posix()
    except ValueError:
        return resolved.name


def command_line(argv: Sequence[str], path_options: Iterable[str] = ()) -> str:
    """A shell command for ``argv`` with the values of ``path_options`` made :func:`portable`.

    Args:
      argv: the arguments, program first (``sys.argv`` or a subprocess's argument list).
      path_options: options whose value is a path (``--workdir``; both ``--opt value`` and
        ``--opt=value`` forms).
    """
    options = tuple(path_options)
    words, expect_path = [], False
    for word in argv:
        if expect_path:
            words.append(portable(word))
            expect_path = False
            continue
        name, sep, value = word.partition("=")
        if name in options and sep:
            words.append(f"{name}={portable(value)}")
        else:
            words.append(word)
            expect_path = word in options
    if words and words[0] == sys.executable:
        words[0] = "python"
    elif words and words[0].endswith(".py"):
        words = ["python", portable(words[0]), *words[1:]]
    return " ".join(shlex.quote(w) for w in words)


def load_average() -> float:
    """The 1-minute load average (0.0 where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def timestamp() -> str:
    """UTC time, to the minute."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def write_json(path: str | os.PathLike, record: Any) -> None:
    """Writes ``record`` to ``path`` atomically (a temporary file, then a rename)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(partial, path)


def read_json(path: str | os.PathLike) -> Any:
    """Reads one record."""
    return json.loads(pathlib.Path(path).read_text())
