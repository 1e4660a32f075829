"""The committed files speak of the project only: no machine paths, no traces of where it was built.

Scans every file git tracks (text files; images skipped) for absolute paths of a particular
machine (its working, temporary, root and home folders), for a placeholder repository owner, for
links to a specification outside the repository, and for words that describe the environment the
project was developed in rather than the project. Paths inside the repository are written
relative to its root; examples use neutral paths such as ``/data/mvtec`` or ``runs/``.

The patterns and the samples below are spelled so that this file does not match itself.
"""

import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "absolute path of a machine": re.compile(
        r"(?<![\w.~/-])/(?:wor[k]|tm[p]|roo[t]|hom[e]|User[s]|mn[t]|scratc[h])/[\w.$*{}-]"
    ),
    "placeholder repository owner": re.compile(r"<org>|<owner>", re.IGNORECASE),
    "specification outside the repository": re.compile(r"\.\./share[d]/SPEC"),
    "trace of the build environment": re.compile(
        r"\ble[n]t\b|\$OU[T]\b|this sessio[n]|build V[M]|device too[l]|\.librar[y]/", re.IGNORECASE
    ),
}
BINARY_SUFFIXES = {".png", ".jpg", ".jpeg", ".npz", ".zip", ".whl", ".pth"}
THIS_FILE = pathlib.Path(__file__).resolve()


def _tracked_files():
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    names = [n for n in out.decode().split("\0") if n]
    return [ROOT / n for n in names if (ROOT / n).is_file()]


def _violations(text):
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        for what, pattern in FORBIDDEN.items():
            match = pattern.search(line)
            if match:
                found.append(f"{number}: {what}: {match.group(0)!r}")
    return found


def test_the_patterns_catch_what_they_are_for():
    work, tmp = "/" + "work", "/" + "tmp"
    assert _violations(f"data at {work}/shared/data/x.zip")
    assert _violations(f'--workdir {tmp}/i8/bench/lite0"')
    assert _violations("no GPU was " + "le" + "nt")
    assert _violations("measured in this " + "session")
    assert _violations("https://github.com/<org>/msad_jax")
    assert _violations("[`SPEC`](../" + "shared/SPEC.md)")
    assert not _violations("python -m msad_jax.main --config configs/folder.py --workdir runs/x")
    assert not _violations("--config.data_dir=/data/mvtec/bottle and ../shared/data/cifar.zip")
    assert not _violations(f'log_dir: str = "{tmp}",  # the temporary folder')
    assert not _violations("equivalent, /dev/accel*, /proc/cpuinfo, /content/drive/MyDrive")


def test_no_machine_paths_or_environment_traces_in_tracked_files():
    problems = {}
    for path in _tracked_files():
        if path.suffix.lower() in BINARY_SUFFIXES or path.resolve() == THIS_FILE:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        found = _violations(text)
        if found:
            problems[str(path.relative_to(ROOT))] = found[:5]
    assert not problems, problems
