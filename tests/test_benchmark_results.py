"""benchmarks/results/ holds records and the pages scripts generate from them, nothing else."""

import importlib.util
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _render_results():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(
        "render_results", ROOT / "benchmarks" / "render_results.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_page_is_what_its_records_generate():
    render_results = _render_results()
    stale = render_results.stale_pages()
    assert not stale, f"regenerate with `python benchmarks/render_results.py`: {stale}"


def test_nothing_but_records_pages_and_plots():
    pages = set(_render_results().pages())
    unexplained = []
    for path in sorted(RESULTS.rglob("*")):
        if path.is_dir():
            continue
        name = path.relative_to(RESULTS).as_posix()
        if path.suffix == ".json":
            json.loads(path.read_text())  # a record is valid JSON
        elif path.suffix == ".png":
            if not path.with_suffix(".json").is_file():
                unexplained.append(f"{name} (a plot without its record)")
        elif name not in pages:
            unexplained.append(name)
    assert not unexplained, f"not generated from records: {unexplained}"
