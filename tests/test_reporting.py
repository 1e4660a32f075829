import csv
import io

import numpy as np
import pytest

from msad_jax import reporting
from msad_jax.reporting import ClassResult

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _results(n=10, epochs=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        curve = sorted(rng.uniform(0.85, 0.99, size=epochs).tolist())
        out.append(
            ClassResult(
                index=i,
                name=CIFAR10[i],
                auroc=curve[-1],
                metrics={
                    "average_precision": rng.uniform(0.9, 1.0),
                    "fpr_at_95_tpr": rng.uniform(),
                },
                epoch_auroc=curve,
            )
        )
    return out


def _table_rows(markdown, first_cell):
    return [line for line in markdown.splitlines() if line.startswith(f"| {first_cell}")]


def test_markdown_has_every_class_and_the_mean():
    results = _results()
    md = reporting.markdown_report("cifar10", list(reversed(results)))  # order is restored
    for r in results:
        row = _table_rows(md, f"{r.index} | {r.name} |")[0]
        assert f"| {100 * r.auroc:.1f} |" in row
    mean = 100 * np.mean([r.auroc for r in results])
    mean_row = next(line for line in md.splitlines() if "**mean**" in line)
    assert f"**{mean:.1f}**" in mean_row
    # The order of classes follows the index.
    positions = [md.index(f"| {i} | {CIFAR10[i]} |") for i in range(10)]
    assert positions == sorted(positions)


def test_per_epoch_table_and_means():
    results = _results(epochs=4)
    md = reporting.markdown_report("cifar10", results, decimals=2)
    assert "ROC-AUC per epoch" in md
    epoch_mean_row = [line for line in md.splitlines() if "**mean**" in line][1]
    cells = [c.strip() for c in epoch_mean_row.strip("|").split("|")][2:]
    expected = [100 * np.mean([r.epoch_auroc[e] for r in results]) for e in range(4)]
    np.testing.assert_allclose([float(c) for c in cells], expected, atol=0.006)


def test_published_numbers_beside_ours():
    results = _results()
    md = reporting.markdown_report("cifar10", results)
    assert "| MSC (published) | ResNet-152 | 98.6 |" in md
    assert "97.5 in arXiv v1" in md
    assert "| DN2 (published) | ResNet-152 | ~92.5 |" in md  # approximate entries are marked
    assert "| PANDA (published) | ResNet-152 | 96.2 |" in md
    ours = 100 * np.mean([r.auroc for r in results])
    msc_row = _table_rows(md, "MSC (published)")[0]
    assert f"{ours - 98.6:+.1f}" in msc_row


@pytest.mark.parametrize(
    ("dataset", "method", "value", "approximate"),
    [
        ("cifar10", "MSC", 98.6, False),
        ("cifar100", "MSC", 96.5, False),
        ("cifar100", "DN2", 89.3, True),
        ("cats_vs_dogs", "MSC", 99.3, True),
        ("cats_vs_dogs", "PANDA", 97.3, True),
        ("fashion_mnist", "MSC", 94.2, True),
        ("fashion_mnist", "PANDA", 95.6, True),
        ("mvtec", "MSC", 87.2, False),
        ("mvtec", "PANDA", 86.5, False),
    ],
)
def test_published_table_matches_spec(dataset, method, value, approximate):
    (entry,) = [e for e in reporting.published_results(dataset, None) if e.method == method]
    assert entry.mean_auroc == value
    assert entry.approximate is approximate


def test_no_dn2_entry_for_mvtec():
    assert [e.method for e in reporting.published_results("mvtec")] == ["MSC", "PANDA"]


def test_csv_round_trip():
    results = _results(n=3, epochs=2)
    text = reporting.csv_report("cifar10", results)
    rows = list(csv.DictReader(io.StringIO(text)))
    kinds = [r["kind"] for r in rows]
    assert kinds == ["class"] * 3 + ["mean"] + ["published"] * 3
    for r, row in zip(results, rows, strict=False):
        assert int(row["index"]) == r.index and row["name"] == r.name
        assert float(row["auroc_pct"]) == pytest.approx(100 * r.auroc, abs=1e-12)
        assert float(row["fpr_at_95_tpr_pct"]) == pytest.approx(100 * r.metrics["fpr_at_95_tpr"])
        assert float(row["auroc_epoch_1_pct"]) == pytest.approx(100 * r.epoch_auroc[1])
    assert float(rows[3]["auroc_pct"]) == pytest.approx(100 * np.mean([r.auroc for r in results]))
    assert "partial" in rows[3]["note"]  # 3 of 10 CIFAR-10 classes
    dn2 = next(r for r in rows if r["method"] == "DN2")
    assert dn2["approximate"] == "true" and float(dn2["auroc_pct"]) == 92.5


def test_write_report(tmp_path):
    md_path, csv_path = reporting.write_report(
        "mvtec", [ClassResult(0, "bottle", 0.9)], tmp_path / "out" / "mvtec", decimals=2
    )
    assert md_path.read_text().startswith("## MVTec AD")
    assert "| 0 | bottle | 90.00 |" in md_path.read_text()
    assert csv_path.read_text().splitlines()[0].startswith("kind,dataset,index")


@pytest.mark.parametrize(
    ("dataset", "results", "match"),
    [
        ("", [ClassResult(0, "a", 0.9)], "dataset name is empty"),
        ("cifar10", [], "no class results"),
        ("cifar10", [ClassResult(0, "a", 0.9), ClassResult(0, "b", 0.8)], "duplicate"),
        ("cifar10", [ClassResult(0, "a", 90.0)], "fraction"),
        ("cifar10", [ClassResult(0, "a", float("nan"))], "fraction"),
        (
            "cifar10",
            [ClassResult(0, "a", 0.9, {"ap": 0.5}), ClassResult(1, "b", 0.9)],
            "same metrics",
        ),
        (
            "cifar10",
            [ClassResult(0, "a", 0.9, epoch_auroc=[0.8]), ClassResult(1, "b", 0.9)],
            "same epochs",
        ),
    ],
)
def test_bad_input_raises(dataset, results, match):
    with pytest.raises(ValueError, match=match):
        reporting.markdown_report(dataset, results)


def test_datasets_without_published_numbers_get_our_table_only():
    results = [ClassResult(0, "bottle", 0.9), ClassResult(1, "cable", 0.8)]
    text = reporting.markdown_report("my_folder", results)
    assert text.startswith("## my_folder: one-class results")
    assert "| 0 | bottle | 90.0 |" in text and "mean of 2 classes" in text
    assert "PANDA" not in text and "DN2" not in text
    rows = reporting.csv_report("my_folder", results).splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["class", "class", "mean"]
    assert reporting.published_results("my_folder") == ()


def test_dataset_without_published_numbers():
    md = reporting.markdown_report("my_folder", [ClassResult(0, "good", 0.75)])
    assert md.startswith("## my_folder: one-class results (%)")
    assert "(published)" not in md
    assert "mean of 1 classes" in md
    rows = list(
        csv.DictReader(io.StringIO(reporting.csv_report("my_folder", [ClassResult(0, "a", 0.5)])))
    )
    assert [r["kind"] for r in rows] == ["class", "mean"]
