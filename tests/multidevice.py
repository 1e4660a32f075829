"""Run a snippet of Python on N fake CPU devices in a fresh interpreter.

The pytest process initialises JAX with a single CPU device, and the device count cannot change
after that, so multi-device checks run in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``. The snippet communicates its result by
printing one JSON object as the last line of its standard output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any


def run_on_devices(source: str, *, devices: int = 8, timeout: float = 600.0) -> Any:
    """Executes ``source`` in a new Python process that sees ``devices`` CPU devices.

    Args:
      source: Python code; its last stdout line must be a JSON document (the result).
      devices: number of fake host devices.
      timeout: seconds before the child is killed.

    Returns:
      The decoded JSON of the child's last stdout line.

    Raises:
      RuntimeError: if the child fails, with its stderr tail in the message.
    """
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"child exited with {proc.returncode}:\n{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}"
        )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if not lines:
        raise RuntimeError(f"child printed nothing; stderr:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])
