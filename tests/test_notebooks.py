"""Every notebook in colab/: stored without outputs, and runs top to bottom in smoke mode.

Each notebook is executed by nbclient in its own kernel -- this interpreter (``sys.executable``)
through a kernelspec written for the test, so a user-level "python3" kernelspec pointing at some
other Python cannot be picked up -- with ``MSAD_JAX_NOTEBOOK_SMOKE=1``, a fresh temporary working
directory, and every HTTP(S) request sent to a dead proxy (smoke mode must be offline).
"""

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

COLAB = Path(__file__).resolve().parents[1] / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))
OURS = ("quickstart.ipynb", "cifar10_table.ipynb", "score_your_images.ipynb")
CELL_TIMEOUT_S = 600
DEAD_PROXY = "http://127.0.0.1:9"  # the discard port: nothing listens, requests fail at once


def _read(path):
    return nbformat.read(path, as_version=nbformat.NO_CONVERT)


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    """A kernelspec folder whose 'python3' kernel is exactly this interpreter."""
    root = tmp_path_factory.mktemp("kernels")
    spec = root / "python3"
    spec.mkdir()
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (test)",
                "language": "python",
            }
        )
    )
    return root


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """One persistent JAX compilation cache for all kernels (same tiny model, compiled once)."""
    return tmp_path_factory.mktemp("jax_cache")


def _kernel_env(compile_cache):
    env = dict(os.environ)
    env.update(
        MSAD_JAX_NOTEBOOK_SMOKE="1",
        MSAD_JAX_OFFLINE="1",
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(compile_cache),
        TF_CPP_MIN_LOG_LEVEL="3",
        PYDEVD_DISABLE_FILE_VALIDATION="1",
    )
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        env[name] = DEAD_PROXY
    for name in ("NO_PROXY", "no_proxy", "XLA_FLAGS"):
        env.pop(name, None)
    return env


def _execute(notebook, workdir, kernel_dir, compile_cache):
    """Runs ``notebook`` in a new kernel with cwd ``workdir``; raises on the first failing cell."""
    manager = AsyncKernelManager(
        kernel_name="python3",
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)]),
    )
    client = NotebookClient(
        notebook,
        km=manager,
        timeout=CELL_TIMEOUT_S,
        startup_timeout=120,
        kernel_name="python3",
        extra_arguments=["--InteractiveShell.colors=nocolor"],  # plain tracebacks in pytest
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute(env=_kernel_env(compile_cache))
    return notebook


def _outputs(notebook):
    return [out for c in notebook.cells if c.cell_type == "code" for out in c.outputs]


def test_our_notebooks_are_there():
    names = {p.name for p in NOTEBOOKS}
    missing = [name for name in OURS if name not in names]
    assert not missing, f"missing notebooks in {COLAB}: {missing}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_stored_without_outputs(path):
    notebook = _read(path)
    nbformat.validate(notebook)
    dirty = [
        i
        for i, c in enumerate(notebook.cells)
        if c.cell_type == "code"
        and (c.outputs or c.execution_count is not None or "execution" in c.metadata)
    ]
    assert not dirty, (
        f"{path.name}: cells {dirty} hold outputs or execution counts; clear them "
        "(Edit > Clear all outputs, or `jupyter nbconvert --clear-output --inplace`)."
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_starts_with_the_expected_run_time(path):
    first = _read(path).cells[0]
    assert first.cell_type == "markdown", f"{path.name}: the first cell must be Markdown"
    missing = [word for word in ("CPU", "GPU", "TPU") if word not in first.source]
    assert not missing, f"{path.name}: the first cell states no run time for {missing}"


def test_the_kernel_is_this_interpreter_in_smoke_mode(tmp_path, kernel_dir, compile_cache):
    code = "import os, sys; print(sys.executable); print(os.environ['MSAD_JAX_NOTEBOOK_SMOKE'])\n"
    code += "print(os.getcwd())"
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    _execute(notebook, tmp_path, kernel_dir, compile_cache)
    lines = "".join(o.get("text", "") for o in _outputs(notebook)).split()
    assert lines == [sys.executable, "1", str(tmp_path)]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_runs_top_to_bottom_in_smoke_mode(path, tmp_path, kernel_dir, compile_cache):
    notebook = _execute(_read(path), tmp_path, kernel_dir, compile_cache)
    errors = [o for o in _outputs(notebook) if o.output_type == "error"]
    assert not errors
    if any("plt.show()" in c.source for c in notebook.cells if c.cell_type == "code"):
        images = [o for o in _outputs(notebook) if "image/png" in o.get("data", {})]
        assert images, f"{path.name} calls plt.show() but displayed no figure"
