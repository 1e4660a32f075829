"""Where a run's numbers go: a JSON-lines file, TensorBoard (when installed) and the log.

``<workdir>/metrics.jsonl`` gets one JSON object per record (``{"step": ..., "loss": ...}`` during
training, ``{"epoch": ..., "auroc": ...}`` after each evaluation); it is appended to, so a resumed
run continues the same file. TensorBoard event files go to ``<workdir>/tensorboard`` when
``tensorboardX`` (no TensorFlow needed) is installed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

from absl import logging


def _plain(value: Any) -> Any:
    """JSON-friendly scalar (NaN/inf become strings, as JSON has no literal for them)."""
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricWriter:
    """Writes scalars to ``metrics.jsonl`` and, if available, TensorBoard.

    Args:
      workdir: the run's folder.
      tensorboard: also write TensorBoard events when ``tensorboardX`` is importable.
    """

    def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 -- closed in close()
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                logging.info("tensorboardX is not installed: no TensorBoard event files.")
            else:
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

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
