"""The run-directory lock (analyses.machinery.io.RunLock): it appears with its record complete, so it is never
taken from a live owner, however slow; a stale one is taken over by one process only."""

import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import analyses.machinery.io
from analyses.machinery.io import RunLock
from probes.errors import CtdInputError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def torchrun_rank(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")


@pytest.fixture
def single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _record(pid, group=None):
    return {"pid": pid, "host": platform.node(), "started": "now", "group": group}


def _child(script, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "TORCHELASTIC_RUN_ID")}
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path, child, what):
    deadline = time.monotonic() + 60
    while not path.exists():
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_the_lock_appears_with_its_record_complete(tmp_path, single_process, monkeypatch):
    lock = tmp_path / ".ctd.lock"
    seen = []
    real_link = os.link

    def link(src, dst):
        seen.append((lock.exists(), json.loads(Path(src).read_text())))
        real_link(src, dst)

    monkeypatch.setattr(analyses.machinery.io.os, "link", link)
    with RunLock(tmp_path):
        assert seen == [(False, json.loads(lock.read_text()))] and seen[0][1]["pid"] == os.getpid()
        assert sorted(p.name for p in tmp_path.iterdir()) == [".ctd.lock"]  # the temporary record is gone
    assert not lock.exists()


def test_without_hard_links_the_lock_is_created_exclusively(tmp_path, single_process, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(analyses.machinery.io.os, "link", no_links)
    lock = tmp_path / ".ctd.lock"
    with RunLock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert sorted(p.name for p in tmp_path.iterdir()) == [".ctd.lock"]
        lock.write_text(json.dumps(_record(os.getppid())))  # now someone else's: exclusive create refuses
        with pytest.raises(CtdInputError, match="another ctd process"):
            RunLock(tmp_path).__enter__()
        lock.write_text(json.dumps(_record(os.getpid())))
    assert not lock.exists()


def test_the_same_process_re_enters_and_keeps_the_lock(tmp_path, single_process):
    lock = tmp_path / ".ctd.lock"
    with RunLock(tmp_path):
        with RunLock(tmp_path):
            pass
        assert lock.exists()  # the inner one did not hold it, so it did not release it
    assert not lock.exists()


def test_another_rank_of_the_same_job_shares_the_lock(tmp_path, torchrun_rank):
    lock = tmp_path / ".ctd.lock"
    lock.write_text(json.dumps(_record(os.getppid(), group="job-1")))
    with RunLock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getppid()
    assert lock.exists()  # the sharing rank does not release the owner's lock


def test_a_live_owner_of_another_job_is_refused_by_pid_not_none(tmp_path, torchrun_rank):
    lock = tmp_path / ".ctd.lock"
    lock.touch()  # an older ctd creates the file and writes its record next: it is read again
    timer = threading.Timer(0.3, lambda: lock.write_text(json.dumps(_record(os.getppid(), group="job-0"))))
    timer.start()
    try:
        with pytest.raises(CtdInputError, match=f"another ctd process \\(pid {os.getppid()},"):
            RunLock(tmp_path).__enter__()
    finally:
        timer.join()


def test_an_empty_lock_is_refused_not_taken_over(tmp_path, single_process, monkeypatch):
    monkeypatch.setattr(RunLock, "_settle_seconds", 0.2, raising=False)
    lock = tmp_path / ".ctd.lock"
    lock.touch()  # no ctd writes an empty lock any more: its writer may be alive, so it is never taken
    with pytest.raises(CtdInputError, match="empty or unreadable; delete the lock file if no ctd process is running") as err:
        RunLock(tmp_path).__enter__()
    assert str(lock) in str(err.value)
    assert lock.exists() and lock.read_text() == ""


def test_a_stale_lock_is_taken_over_and_released(tmp_path, single_process):
    lock = tmp_path / ".ctd.lock"
    lock.write_text(json.dumps(_record(_dead_pid())))
    with RunLock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_a_stale_lock_taken_over_meanwhile_by_another_process_is_kept(tmp_path, single_process, monkeypatch):
    lock = tmp_path / ".ctd.lock"
    lock.write_text(json.dumps(_record(_dead_pid())))
    winner = _record(os.getppid())
    real_alive = RunLock._owner_alive

    def judged_then_overtaken(self, info):
        alive = real_alive(self, info)
        if not alive:  # between our look and our takeover, another process takes the stale lock over
            lock.unlink()
            lock.write_text(json.dumps(winner))
        return alive

    monkeypatch.setattr(RunLock, "_owner_alive", judged_then_overtaken)
    with pytest.raises(CtdInputError, match=f"another ctd process \\(pid {os.getppid()},"):
        RunLock(tmp_path).__enter__()
    assert json.loads(lock.read_text()) == winner


# The owner writes its record slowly: it signals `ready` from inside json.dump (the write of both the
# old create-then-write lock and the new linked one), then waits until the other process has decided.
_SLOW_OWNER = r"""
import json, os, sys, time
import analyses.machinery.io as io
from probes.errors import CtdInputError
run, ready, decided = sys.argv[1:4]
real_dump = json.dump
def slow_dump(*args, **kwargs):
    open(ready, "w").close()
    deadline = time.monotonic() + 5
    while not os.path.exists(decided) and time.monotonic() < deadline:
        time.sleep(0.02)
    real_dump(*args, **kwargs)
io.json.dump = slow_dump
try:
    with io.RunLock(run):
        print("held", flush=True)
        time.sleep(0.5)
except CtdInputError as err:
    print("refused", err, flush=True)
"""


def test_a_slow_owner_is_not_overtaken(tmp_path, single_process):
    run, ready, decided = tmp_path / "run", tmp_path / "ready", tmp_path / "decided"
    child = _child(_SLOW_OWNER, run, ready, decided)
    try:
        _wait_for(ready, child, "the child never began writing its lock record")
        try:
            with RunLock(run):
                decided.touch()
                out, err = child.communicate(timeout=60)  # hold the lock until the child has decided
                parent = "held"
        except CtdInputError:
            decided.touch()
            out, err = child.communicate(timeout=60)
            parent = "refused"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err
    assert sorted([parent, out.split()[0]]) == ["held", "refused"], f"parent {parent}; child: {out.strip()}"


# Two processes judge the same lock stale; the second goes on 0.3 s after the first (which has taken
# the lock over by then), so a takeover that does not look again deletes the first one's lock.
_STALE_TAKER = r"""
import os, sys, time
import analyses.machinery.io as io
from probes.errors import CtdInputError
run, me, other, delay = sys.argv[1:5]
real_alive = io.RunLock._owner_alive
looks = []
def alive(self, info):
    result = real_alive(self, info)
    if not looks:
        looks.append(result)
        open(me, "w").close()
        deadline = time.monotonic() + 30
        while not os.path.exists(other) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(float(delay))
    return result
io.RunLock._owner_alive = alive
try:
    with io.RunLock(run):
        print("held", looks, flush=True)
        time.sleep(1.0)
except CtdInputError as err:
    print("refused", looks, err, flush=True)
"""


def test_one_of_two_processes_takes_a_stale_lock_over(tmp_path, single_process):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".ctd.lock").write_text(json.dumps(_record(_dead_pid())))
    a, b = tmp_path / "a", tmp_path / "b"
    children = [_child(_STALE_TAKER, run, a, b, 0.0), _child(_STALE_TAKER, run, b, a, 0.3)]
    try:
        outs = [child.communicate(timeout=60) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert [child.returncode for child in children] == [0, 0], [err for _, err in outs]
    said = [out.split(maxsplit=2) for out, _ in outs]
    assert all(words[1] == "[False]" for words in said), said  # both judged the lock stale
    assert sorted(words[0] for words in said) == ["held", "refused"], said
    assert not (run / ".ctd.lock").exists()


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has it now (pids are not reused this quickly)


def test_an_owner_on_another_host_is_respected_whatever_its_pid(tmp_path):
    """A run directory on a shared file system: a pid from another machine says nothing about this
    one's processes, so the lock is refused, never taken over."""
    lock = tmp_path / ".ctd.lock"
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": platform.node() + "-elsewhere", "started": "now", "group": None}))
    with pytest.raises(CtdInputError, match="another ctd process"):
        RunLock(tmp_path).__enter__()
    assert lock.exists()


def test_an_owner_we_may_not_signal_is_alive(tmp_path, monkeypatch):
    """os.kill(pid, 0) raising PermissionError means the process exists under another user."""
    lock = tmp_path / ".ctd.lock"
    lock.write_text(json.dumps({"pid": 424242, "host": platform.node(), "started": "now", "group": None}))

    def not_permitted(pid, signal):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", not_permitted)
    with pytest.raises(CtdInputError, match="another ctd process"):
        RunLock(tmp_path).__enter__()
    assert json.loads(lock.read_text())["pid"] == 424242
