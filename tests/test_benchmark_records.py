"""Helpers of the benchmark records: publishable paths and commands, and the demo report."""

import copy
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import demo_digits  # noqa: E402
import records  # noqa: E402


def test_paths_inside_the_repository_are_relative_and_others_are_names(tmp_path):
    assert records.portable(ROOT / "configs" / "demo.py") == "configs/demo.py"
    assert records.portable(tmp_path / "data" / "cifar.zip") == "cifar.zip"


def test_command_line_hides_machine_paths(tmp_path):
    argv = [
        str(ROOT / "benchmarks" / "demo_digits.py"),
        "--workdir",
        str(tmp_path / "runs"),
        f"--data={tmp_path / 'x.zip'}",
        "--digits",
        "3",
    ]
    line = records.command_line(argv, ["--workdir", "--data"])
    assert line == "python benchmarks/demo_digits.py --workdir runs --data=x.zip --digits 3"
    assert str(tmp_path) not in line


def test_write_json_replaces_the_file_whole(tmp_path):
    path = tmp_path / "a" / "record.json"
    records.write_json(path, {"x": 1})
    records.write_json(path, {"x": 2, "y": [1.5]})
    assert records.read_json(path) == {"x": 2, "y": [1.5]}
    assert [p.name for p in path.parent.iterdir()] == ["record.json"]


def _record(setting, digit, pretrained, final):
    metrics = {"average_precision": 0.9, "fpr_at_95_tpr": 0.1}
    return {
        "setting": setting,
        "digit": digit,
        "command": f"python -m msad_jax.main --config configs/demo.py "
        f"--config.normal_class={digit} --workdir {digit}",
        "xla_flags": "",
        "counts": {"train": 120, "test": 599},
        "pretrained": {"auroc": pretrained, **metrics},
        "final": {"auroc": final, **metrics},
        "wall_s": 100.0 + digit,
        "cpu_s": 90.0,
        "peak_rss_mib": 1700.0,
        "load_1min": {"start": 2.0, "end": 2.5},
        "machine": {"cpu": "Some CPU", "cores": 2, "isa": ["avx2"], "python": "3.11",
                    "packages": {"jax": "0.10.2"}},
        "git": {"commit": "0123456789abcdef", "modified": []},
        "finished": f"2026-01-01 10:0{digit} UTC",
    }  # fmt: skip


def test_demo_report_states_the_spread_between_settings():
    found = [_record("default", d, 0.90 + d / 100, 0.92 + d / 100) for d in range(3)]
    other = copy.deepcopy(found)
    for record in other:
        record["setting"] = "eigen_convolutions"
    other[1]["final"]["auroc"] += 0.005  # digit 1 differs by 0.50 points after fine-tuning
    text = demo_digits.markdown(found + other)
    assert "| 1 | 120 | 91.00 | 93.00 | 91.00 | 93.50 |" in text
    assert (
        "after fine-tuning: largest difference on one digit 0.50 points (digit 1), median "
        "0.00; digits that differ at all: 1 of 3" in text
    )
    assert "pretrained kNN: largest difference on one digit 0.00 points" in text
    assert "commit 0123456789, clean tree" in text


def test_demo_report_lists_each_recorded_form_of_a_setting():
    found = [_record("eigen_convolutions", d, 0.9, 0.9) for d in range(3)]
    found[0]["command"] += " --cpu_eigen_convolutions"
    for record in found[1:]:
        record["xla_flags"] = demo_digits.EIGEN_CONVOLUTIONS
    assert demo_digits.recorded_options(found[0]) == "--cpu_eigen_convolutions"
    assert demo_digits.recorded_options(found[1]) == ""
    text = demo_digits.markdown(found)
    rows = [line for line in text.splitlines() if line.startswith("| `eigen_convolutions` | ")]
    rows = rows[:-1]  # the last one is the time table's
    assert len(rows) == 2, rows
    assert rows[0].startswith("| `eigen_convolutions` | -- | `--xla_cpu_")
    assert rows[0].endswith(" 2 |")
    assert rows[1].startswith("| `eigen_convolutions` | `--cpu_eigen_convolutions` | -- |")
    assert rows[1].endswith(" 1 |")


def test_demo_report_needs_records():
    with pytest.raises(FileNotFoundError, match="No demo records"):
        demo_digits.markdown([])
