"""metrics.jsonl holds every step once, however often a run is stopped and resumed."""

import json

import pytest

from msad_jax.metric_writer import MetricWriter, keep_records_up_to, read_metrics


def _write(path, records, torn_tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + torn_tail)


def test_records_after_the_resumed_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 1.0 / s} for s in range(1, 8)]
    records.insert(3, {"epoch": 1, "step": 3, "auroc": 0.9})
    _write(path, records, torn_tail='{"step": 8, "lo')
    keep_records_up_to(path, 5)
    kept = read_metrics(path)
    assert [r["step"] for r in kept] == [1, 2, 3, 3, 4, 5]
    assert path.read_text().endswith("\n")
    keep_records_up_to(path, None)
    assert path.read_text() == ""


def test_nothing_is_rewritten_when_nothing_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [{"step": 1}, {"step": 2}])
    before = path.stat().st_mtime_ns, path.read_text()
    keep_records_up_to(path, 2)
    assert (path.stat().st_mtime_ns, path.read_text()) == before


def test_writer_continues_from_the_checkpoint_and_a_fresh_run_starts_empty(tmp_path):
    writer = MetricWriter(tmp_path, tensorboard=False)
    for step in range(1, 6):
        writer.write({"step": step, "loss": 0.5}, step=step)
    writer.close()
    resumed = MetricWriter(tmp_path, tensorboard=False, resume_step=3)  # killed after step 5
    for step in range(4, 7):
        resumed.write({"step": step, "loss": 0.25}, step=step)
    resumed.close()
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]
    MetricWriter(tmp_path, tensorboard=False).close()
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def _tensorboard_events(folder):
    """(file, step, kind, value) of every event in the TensorBoard files, in writing order."""
    import struct

    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(folder.iterdir(), key=lambda p: p.name.rsplit(".", 1)[-1]):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[offset + 12 : offset + 12 + length])
            offset += length + 16
            kind = event.WhichOneof("what")
            value = [v.simple_value for v in event.summary.value] if kind == "summary" else None
            events.append((path.name, event.step, kind, value))
    return events


def test_tensorboard_purges_the_steps_a_resumed_run_writes_again(tmp_path):
    pytest.importorskip("tensorboardX")
    writer = MetricWriter(tmp_path)
    for step in range(1, 6):
        writer.write({"loss": float(step)}, step=step, prefix="train/")
    writer.close()
    resumed = MetricWriter(tmp_path, resume_step=3)
    for step in range(4, 7):
        resumed.write({"loss": 10.0 + step}, step=step, prefix="train/")
    resumed.close()
    events = _tensorboard_events(tmp_path / "tensorboard")
    files = sorted({e[0] for e in events})
    assert len(files) == 2  # the resumed run's file does not replace the first one
    first = [e[1:] for e in events if e[0] == files[0] and e[2] != "file_version"]
    second = [e[1:] for e in events if e[0] == files[1] and e[2] != "file_version"]
    # TensorBoard drops earlier events at or after a session start's step (the purge step).
    assert first[0] == (0, "session_log", None)
    assert [s for s, kind, _ in first if kind == "summary"] == [1, 2, 3, 4, 5]
    assert second[0] == (4, "session_log", None)
    assert [(s, v) for s, kind, v in second if kind == "summary"] == [
        (4, [14.0]),
        (5, [15.0]),
        (6, [16.0]),
    ]
