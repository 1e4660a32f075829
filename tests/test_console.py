"""Command-line behaviour: ``--help`` of every ``python -m`` entry point, logs beside tqdm bars."""

import io
import logging
import os
import pathlib
import re
import subprocess
import sys

import pytest
import tqdm

from msad_jax import console

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _entry_points():
    """Every module of the package that runs as ``python -m``."""
    found = []
    for path in sorted((ROOT / "msad_jax").rglob("*.py")):
        if 'if __name__ == "__main__":' in path.read_text():
            found.append(".".join(path.relative_to(ROOT).with_suffix("").parts))
    return found


def test_the_known_commands_are_entry_points():
    assert {"msad_jax.main", "msad_jax.score", "msad_jax.analysis.conditioning"} <= set(
        _entry_points()
    )


@pytest.mark.parametrize(
    "module, flag",
    [(module, "--help") for module in _entry_points()] + [("msad_jax.main", "-h")],
)
def test_help_prints_the_usage_and_exits_0(module, flag):
    proc = subprocess.run(
        [sys.executable, "-m", module, flag],
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"python -m {module}" in proc.stdout, proc.stdout[:2000]
    assert "--workdir" in proc.stdout
    assert "error" not in proc.stderr.lower(), proc.stderr[-2000:]


def test_wants_help_stops_at_double_dash():
    assert console.wants_help(["prog", "--config", "x.py", "--helpfull"])
    assert not console.wants_help(["prog", "--", "--help"])
    assert not console.wants_help(["--help"])  # the program name is not an argument


def _bar_with_a_log_line(handler):
    """Logs one line while a tqdm bar is drawn on the handler's stream; returns the text."""
    logger = logging.getLogger("msad_jax.test_console")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        with tqdm.tqdm(
            total=4, file=handler.stream, desc="training", ascii=True, mininterval=0
        ) as bar:
            bar.update(1)
            logger.info("epoch 1: ROC-AUC 50.00%")
            bar.update(1)
    finally:
        logger.handlers.clear()
    return handler.stream.getvalue()


def _segments_with(text, needle):
    """The pieces of terminal output (split at carriage returns and newlines) holding needle."""
    return [s for s in re.split(r"[\r\n]", text) if needle in s]


def test_log_lines_never_land_on_the_progress_bar():
    plain = logging.StreamHandler(io.StringIO())
    plain.setFormatter(logging.Formatter("%(message)s"))
    glued = _segments_with(_bar_with_a_log_line(plain), "ROC-AUC")
    assert glued and "training" in glued[0]  # a plain handler writes behind the bar

    safe = console.TqdmSafeHandler(io.StringIO())
    safe.setFormatter(logging.Formatter("%(message)s"))
    text = _bar_with_a_log_line(safe)
    assert _segments_with(text, "ROC-AUC") == ["epoch 1: ROC-AUC 50.00%"]
    assert "2/4" in text  # the bar is drawn again after the line


def test_log_to_console_installs_one_handler_and_stops_propagation():
    name = "msad_jax.test_console_setup"
    logger = logging.getLogger(name)
    stream = io.StringIO()
    try:
        console.log_to_console(name, logging.WARNING, stream=stream, fmt="%(message)s")
        handler = console.log_to_console(name, logging.INFO, stream=stream, fmt="%(message)s")
        assert logger.handlers == [handler] and not logger.propagate
        logging.getLogger(f"{name}.child").info("hello")
        assert stream.getvalue() == "hello\n"
    finally:
        logger.handlers.clear()
        logger.propagate = True
