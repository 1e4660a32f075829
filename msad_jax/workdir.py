"""A run's workdir: checking its path, and the lock that keeps a second run out of it.

``<workdir>/run.lock`` names its holder (host, pid, process start time) and is created with
``O_EXCL``. A lock whose process is gone on this host (or whose pid was reused) is stale and taken
over; a live holder, or one on another host, is refused with one line naming it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import socket
import time

from msad_jax.errors import UserError

LOCK_FILE = "run.lock"
_READ_RETRIES = 10
_READ_PAUSE_S = 0.1


class WorkdirError(UserError, RuntimeError):
    """The workdir cannot be used: it is a file, or another run holds it."""


class WorkdirBusyError(WorkdirError):
    """Another live run holds the workdir's lock."""


def check_workdir_path(workdir: str | os.PathLike) -> None:
    """Refuses a ``--workdir`` that names an existing file.

    Raises:
      WorkdirError: naming the file.
    """
    path = os.fspath(workdir)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise WorkdirError(
            f"--workdir {path} is an existing file, not a folder; give a folder (it is created if "
            "needed) or move that file away."
        )


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of process ``pid`` (clock ticks since boot), or None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            stat = handle.read()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": field 3 onwards
    return fields[19] if len(fields) > 19 else None


@dataclasses.dataclass(frozen=True)
class LockHolder:
    """Who holds a workdir lock.

    Attributes:
      host: host name.
      pid: process id on that host.
      started: when the run took the lock (local time, ISO 8601).
      process_start: the process's start time from the kernel (guards against pid reuse).
    """

    host: str
    pid: int
    started: str
    process_start: str | None = None

    @classmethod
    def current(cls) -> LockHolder:
        """This process."""
        pid = os.getpid()
        now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        return cls(socket.gethostname(), pid, now, process_start_time(pid))

    def describe(self) -> str:
        """One phrase naming the holder."""
        return f"process {self.pid} on host {self.host}, started {self.started}"

    def is_alive(self) -> bool | None:
        """True/False on this host; None for a holder on another host (unknown)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # a live process of another user
            pass
        if self.process_start is None:
            return True
        return process_start_time(self.pid) in (None, self.process_start)


def _parse(text: str) -> LockHolder | None:
    try:
        fields = json.loads(text)
        return LockHolder(
            host=str(fields["host"]),
            pid=int(fields["pid"]),
            started=str(fields["started"]),
            process_start=fields.get("process_start"),
        )
    except (ValueError, KeyError, TypeError):
        return None


class WorkdirLock:
    """The lock of one workdir (see the module doc); also a context manager.

    Args:
      workdir: the run's folder (must exist).
    """

    def __init__(self, workdir: str | os.PathLike):
        self.path = os.path.join(os.fspath(workdir), LOCK_FILE)
        self.holder: LockHolder | None = None

    def _create(self, holder: LockHolder) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(dataclasses.asdict(holder), handle)
        return True

    def _read(self) -> tuple[str, LockHolder | None] | None:
        """The lock file's text and holder; None if the file is gone. Waits out a partial write."""
        text = ""
        for _ in range(_READ_RETRIES):
            try:
                with open(self.path, encoding="utf-8") as handle:
                    text = handle.read()
            except FileNotFoundError:
                return None
            holder = _parse(text)
            if holder is not None:
                return text, holder
            time.sleep(_READ_PAUSE_S)
        return text, None

    def _remove_stale(self, stale_text: str) -> None:
        """Removes the lock file if it still holds ``stale_text`` (another taker may have won)."""
        moved = f"{self.path}.stale-{os.getpid()}"
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return
        with open(moved, encoding="utf-8") as handle:
            current = handle.read()
        if current != stale_text:  # another run took the lock meanwhile: put its lock back
            with contextlib.suppress(FileExistsError):
                os.link(moved, self.path)
        os.remove(moved)

    def acquire(self) -> LockHolder:
        """Takes the lock, taking over a stale one.

        Returns:
          This process as the holder.

        Raises:
          WorkdirBusyError: a live run (or one on another host) holds it.
        """
        me = LockHolder.current()
        for _ in range(5):
            if self._create(me):
                self.holder = me
                return me
            found = self._read()
            if found is None:  # released meanwhile
                continue
            text, holder = found
            if holder is None:
                raise WorkdirBusyError(
                    f"The workdir lock {self.path} is unreadable ({text[:80]!r}); if no run uses "
                    "this workdir, delete that file and start again."
                )
            alive = holder.is_alive()
            if alive is False:
                self._remove_stale(text)
                continue
            where = "" if alive else " (on another host, so it cannot be checked from here)"
            raise WorkdirBusyError(
                f"Another run is using this workdir: {holder.describe()}{where}; wait for it to "
                f"finish or use another --workdir (if that run is gone, delete {self.path})."
            )
        raise WorkdirBusyError(f"Could not take the workdir lock {self.path}; try again.")

    def release(self) -> None:
        """Removes the lock file if this process holds it."""
        if self.holder is None:
            return
        found = self._read()
        if found is not None and found[1] == self.holder:
            os.remove(self.path)
        self.holder = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
