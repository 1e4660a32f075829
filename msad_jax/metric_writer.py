"""Where a run's numbers go: a JSON-lines file, TensorBoard (when installed) and the log.

``<workdir>/metrics.jsonl`` gets one JSON object per record. A resumed run first drops the records
after the checkpoint it resumes from, so every step is recorded once however often it is killed.
TensorBoard files (``<workdir>/tensorboard``, when ``tensorboardX`` is installed) are purged alike.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

from absl import logging


def _plain(value: Any) -> Any:
    """JSON-friendly scalar (NaN/inf become strings, as JSON has no literal for them)."""
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def keep_records_up_to(path: str | os.PathLike, step: int | None) -> None:
    """Drops the records of ``path`` whose step is after ``step`` (None: drops them all)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as handle:
        lines = handle.readlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the torn last line of a killed run
        if step is not None and isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if kept == lines:
        return
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.writelines(kept)
    os.replace(temporary, path)


class MetricWriter:
    """Writes scalars to ``metrics.jsonl`` and, if available, TensorBoard.

    Args:
      workdir: the run's folder.
      tensorboard: also write TensorBoard events when ``tensorboardX`` is importable.
      resume_step: the step of the checkpoint the run resumes from: later records are dropped (see
        the module doc); None for a run that starts from scratch (the file is emptied).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        tensorboard: bool = True,
        resume_step: int | None = None,
    ):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "metrics.jsonl")
        keep_records_up_to(self.path, resume_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 -- closed in close()
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                logging.info("tensorboardX is not installed: no TensorBoard event files.")
            else:
                purge = 0 if resume_step is None else resume_step + 1
                self._tb = SummaryWriter(
                    os.path.join(workdir, "tensorboard"),
                    purge_step=purge,
                    filename_suffix=f".{time.time_ns()}",  # a quick restart must not overwrite
                )

    def write(self, record: Mapping[str, Any], *, step: int, prefix: str = "") -> None:
        """Appends one record; numeric entries also go to TensorBoard at ``step``."""
        line = {key: _plain(value) for key, value in record.items()}
        self._file.write(json.dumps(line, sort_keys=True) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in line.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self._tb.add_scalar(prefix + key, value, step)

    def close(self) -> None:
        """Flushes and closes the outputs."""
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads a ``metrics.jsonl`` file back (skipping a torn last line of a killed run)."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
