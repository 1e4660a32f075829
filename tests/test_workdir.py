"""The workdir lock: a live holder is refused, a dead one is taken over; a file is no workdir."""

import dataclasses
import json
import os
import socket
import subprocess
import sys

import pytest

from msad_jax.workdir import (
    LOCK_FILE,
    LockHolder,
    WorkdirBusyError,
    WorkdirError,
    WorkdirLock,
    check_workdir_path,
    process_start_time,
)


def _write_lock(workdir, **fields):
    holder = {"host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00", **fields}
    (workdir / LOCK_FILE).write_text(json.dumps(holder))


@pytest.fixture
def live_process():
    """A sleeping child process: a live holder other than this test's process."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def dead_pid():
    """The id of a process that has exited (as after ``kill -9``)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_names_its_holder_and_is_removed_on_release(tmp_path):
    lock = WorkdirLock(tmp_path)
    me = lock.acquire()
    saved = json.loads((tmp_path / LOCK_FILE).read_text())
    assert saved == dataclasses.asdict(me)
    assert (saved["host"], saved["pid"]) == (socket.gethostname(), os.getpid())
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_live_holder_is_refused_with_one_line_naming_it(tmp_path, live_process):
    _write_lock(tmp_path, pid=live_process.pid, process_start=process_start_time(live_process.pid))
    before = (tmp_path / LOCK_FILE).read_text()
    with pytest.raises(WorkdirBusyError) as err:
        WorkdirLock(tmp_path).acquire()
    message = str(err.value)
    assert f"process {live_process.pid} on host {socket.gethostname()}" in message
    assert "2026-01-01T00:00:00+00:00" in message and "\n" not in message
    assert (tmp_path / LOCK_FILE).read_text() == before  # the holder's lock is untouched


def test_a_second_lock_in_the_same_workdir_is_refused(tmp_path):
    with WorkdirLock(tmp_path), pytest.raises(WorkdirBusyError, match=f"process {os.getpid()}"):
        WorkdirLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_dead_holder_is_taken_over(tmp_path, dead_pid):
    _write_lock(tmp_path, pid=dead_pid)
    lock = WorkdirLock(tmp_path)
    me = lock.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == me.pid == os.getpid()
    assert not [p for p in os.listdir(tmp_path) if p != LOCK_FILE]  # no leftovers
    lock.release()


def test_a_reused_pid_does_not_keep_a_stale_lock(tmp_path, live_process):
    # The recorded holder had this pid but started at another time: the pid was reused.
    _write_lock(tmp_path, pid=live_process.pid, process_start="1")
    assert LockHolder(socket.gethostname(), live_process.pid, "x", "1").is_alive() is False
    WorkdirLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_holder_on_another_host_is_refused(tmp_path, dead_pid):
    _write_lock(tmp_path, pid=dead_pid, host="some-other-host")
    with pytest.raises(WorkdirBusyError, match="on host some-other-host.*another host"):
        WorkdirLock(tmp_path).acquire()


def test_an_unreadable_lock_file_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr("msad_jax.workdir._READ_PAUSE_S", 0.0)
    (tmp_path / LOCK_FILE).write_text("{not json")
    with pytest.raises(WorkdirBusyError, match=f"{LOCK_FILE} is unreadable"):
        WorkdirLock(tmp_path).acquire()


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "results.txt"
    path.write_text("x")
    with pytest.raises(WorkdirError, match="is an existing file, not a folder"):
        check_workdir_path(path)
    check_workdir_path(tmp_path)  # a folder, or a path that does not exist yet, is fine
    check_workdir_path(tmp_path / "new")
