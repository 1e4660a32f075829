"""The notebooks' install cell: the same in every notebook, and it installs this checkout.

The cell is what a Colab user runs first. Here it runs, as stored in the notebooks, in a
throwaway virtual environment where msad_jax is not importable, with ``MSAD_JAX_SOURCE`` set to a
wheel built from this checkout (the "uploaded wheel" path; building it is what pip does with an
uploaded folder) and pip kept offline (``--no-index --no-deps``: dependencies are not what is
tested here). Then once more, where it must see msad_jax and install nothing.
"""

import configparser
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))


def _load_set_repo_url():
    spec = importlib.util.spec_from_file_location(
        "set_repo_url", ROOT / "colab" / "set_repo_url.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


set_repo_url = _load_set_repo_url()


def _install_source(path):
    return set_repo_url.install_cell(nbformat.read(path, as_version=nbformat.NO_CONVERT)).source


def test_every_notebook_has_the_same_install_cell_first():
    sources = {path.name: _install_source(path) for path in NOTEBOOKS}
    assert len(set(sources.values())) == 1, f"install cells differ: {sorted(sources)}"
    for path in NOTEBOOKS:
        first_code = next(
            c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"
        )
        assert first_code.source == sources[path.name], f"{path.name}: install cell not first"


def test_the_repository_url_is_empty_or_usable():
    # Empty until the repository is published (the cell then asks for a URL or a SOURCE, tested
    # below); afterwards the URL colab/set_repo_url.py wrote. Never a placeholder.
    for path in NOTEBOOKS:
        (url,) = re.findall(r'^REPO_URL = "([^"]*)"', _install_source(path), re.MULTILINE)
        assert url == "" or (set_repo_url.check_url(url) and "<" not in url), (path.name, url)


def test_set_repo_url_changes_only_the_url_line(tmp_path):
    copies = []
    for path in NOTEBOOKS:
        shutil.copy(path, tmp_path / path.name)
        copies.append(tmp_path / path.name)
    url = "https://github.com/someone/msad_jax"
    changed = set_repo_url.set_repo_url(url, copies)
    assert changed == copies
    for original, copy in zip(NOTEBOOKS, copies, strict=True):
        before, after = original.read_text().splitlines(), copy.read_text().splitlines()
        differing = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
        assert len(differing) == 1, differing
        assert f'REPO_URL = \\"{url}\\"' in differing[0][1]
    assert set_repo_url.set_repo_url(url, copies) == []  # idempotent
    link = set_repo_url.colab_link(url + ".git", "main", "quickstart.ipynb")
    assert link == (
        "https://colab.research.google.com/github/someone/msad_jax/blob/main/colab/quickstart.ipynb"
    )
    with pytest.raises(ValueError, match="not a usable"):
        set_repo_url.with_repo_url(_install_source(NOTEBOOKS[0]), 'x" + "y')


def _checkout_version():
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser["metadata"]["version"]


def _venv_python(venv):
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel of this checkout, built offline from a copy of its package files."""
    root = tmp_path_factory.mktemp("checkout")
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, root / name)
    shutil.copytree(
        ROOT / "msad_jax", root / "msad_jax", ignore=shutil.ignore_patterns("__pycache__")
    )
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index",
         "--no-build-isolation", "-w", str(dist), str(root)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    (built,) = dist.glob("msad_jax-*.whl")
    return built


def _run_cell(python, source, cwd, env):
    return subprocess.run(
        [str(python), "-c", source], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_install_cell_installs_the_checkout_where_msad_jax_is_missing(tmp_path, wheel):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = _venv_python(venv)
    source = _install_source(NOTEBOOKS[0])
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME") and not k.startswith("PIP_")
    }
    env["PIP_CONFIG_FILE"] = os.devnull  # no index, find-links or constraints of this machine

    missing = _run_cell(python, source, tmp_path, env)
    assert missing.returncode != 0
    assert "Set REPO_URL in this cell" in missing.stderr, missing.stderr[-2000:]

    env.update(MSAD_JAX_SOURCE=str(wheel), MSAD_JAX_PIP_OPTIONS="--no-index --no-deps")
    installed = _run_cell(python, source, tmp_path, env)
    assert installed.returncode == 0, installed.stderr[-3000:]
    assert f"msad_jax installed from {wheel.resolve().as_uri()}" in installed.stdout
    where = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m, importlib.util as u; "
         "print(m.version('msad_jax')); print(u.find_spec('msad_jax').origin)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True, timeout=120,
    ).stdout.split()  # fmt: skip
    assert where[0] == _checkout_version()
    assert pathlib.Path(where[1]).is_relative_to(venv)

    again = _run_cell(python, source, tmp_path, env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.startswith("msad_jax is installed:"), again.stdout
