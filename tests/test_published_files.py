"""The committed files speak of the project only: no machine paths, no traces of where it was built.

Scans every file git tracks (text files; images skipped) for absolute paths of a particular
machine (``/work/...``, ``/tmp/...``, ``/root/...``, home folders), for a placeholder repository
owner, for links to a specification outside the repository, and for words that describe the
environment the project was developed in rather than the project. Paths inside the repository
are written relative to its root; examples use neutral paths such as ``/data/mvtec`` or ``runs/``.
"""

import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "absolute path of a machine": re.compile(
        r"(?<![\w.~/-])/(?:work|tmp|root|home|Users|mnt|scratch)/[\w.$*{}-]"
    ),
    "placeholder repository owner": re.compile(r"<org>|<owner>", re.IGNORECASE),
    "specification outside the repository": re.compile(r"\.\./shared/SPEC"),
    "trace of the build environment": re.compile(
        r"\blent\b|\$OUT\b|this session|build VM|device tool|\.library/", re.IGNORECASE
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
    assert _violations("data at /work/shared/data/x.zip")
    assert _violations('--workdir /tmp/i8/bench/lite0"')
    assert _violations("no GPU was lent to this session")
    assert _violations("https://github.com/<org>/msad_jax")
    assert _violations("[`SPEC`](../shared/SPEC.md)")
    assert not _violations("python -m msad_jax.main --config configs/folder.py --workdir runs/x")
    assert not _violations("--config.data_dir=/data/mvtec/bottle and ../shared/data/cifar.zip")
    assert not _violations('log_dir: str = "/tmp",  # the temporary folder')
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
