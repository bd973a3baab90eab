"""The run-directory lock (analyses.io.RunLock) between the moment its owner creates the file and the
moment it writes its record: the window in which another rank of a torchrun job can look."""

import json
import os
import platform
import threading

import pytest

from analyses.io import RunLock
from probes.errors import CtdInputError


@pytest.fixture
def torchrun_rank(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")


def _write_later(path, record, delay):
    timer = threading.Timer(delay, lambda: path.write_text(json.dumps(record)))
    timer.start()
    return timer


def test_another_rank_waits_for_the_owners_record(tmp_path, torchrun_rank):
    lock = tmp_path / ".ctd.lock"
    lock.touch()  # rank 0 has created the file but not yet written it
    owner = {"pid": os.getppid(), "host": platform.node(), "started": "now", "group": "job-1"}
    timer = _write_later(lock, owner, 0.3)
    try:
        with RunLock(tmp_path):  # same torchrun job: shares the lock once the record is readable
            assert json.loads(lock.read_text())["pid"] == os.getppid()
    finally:
        timer.join()
    assert lock.exists()  # the sharing rank does not release the owner's lock


def test_a_live_owner_of_another_job_is_refused_by_pid_not_none(tmp_path, torchrun_rank):
    lock = tmp_path / ".ctd.lock"
    lock.touch()
    owner = {"pid": os.getppid(), "host": platform.node(), "started": "now", "group": "job-0"}
    timer = _write_later(lock, owner, 0.3)
    try:
        with pytest.raises(CtdInputError, match=f"another ctd process \\(pid {os.getppid()},"):
            RunLock(tmp_path).__enter__()
    finally:
        timer.join()


def test_a_lock_left_empty_by_a_dead_writer_is_taken_over(tmp_path):
    lock = tmp_path / ".ctd.lock"
    lock.touch()  # its writer died between creating and writing it
    with RunLock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()
