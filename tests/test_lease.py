"""The run dir's lease: who may write, and when a lease left behind is taken over.

The races are played out deterministically: a foreign writer is run at the exact moment between a
holder's read and its write (by wrapping the read), and time is an injected clock, so no test
sleeps over a race and each takes milliseconds.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time

import pytest

from noesis_accel.rundir.generations import GenerationalRecord
from noesis_accel.rundir.layout import RunDir, this_host
from noesis_accel.rundir.lease import LeaseHeld, Owner, RunLease, read_lease

NOW = 1_800_000_000.0  # the injected clock's "now"
QUIET = 3600.0  # a heartbeat interval no test waits for: renewals are called by hand


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _foreign_lease(rundir: RunDir, heartbeat_age: float, group: str | None = None, now: float = NOW) -> None:
    """Another machine's process writes the next generation of the lease, as its heartbeat would."""
    records = GenerationalRecord(rundir.lease_dir)
    current = records.current()
    record = {
        "host": "another-machine",
        "pid": 4242,
        "started": now - 600,
        "token": "theirs",
        "group": group,
        "heartbeat": now - heartbeat_age,
    }
    assert records.swap(current.number, record)


def _lease(rundir: RunDir, clock: Clock | None = None, stale_after_s: float = 120, **owner: object) -> RunLease:
    lease = RunLease(rundir, stale_after_s=stale_after_s, heartbeat_s=QUIET, clock=clock or Clock())
    if owner:
        fields = {**lease.owner.__dict__, **owner}
        lease.owner = Owner(**fields)  # type: ignore[arg-type]
    return lease


def _holder(rundir: RunDir) -> str | None:
    lease = read_lease(rundir)
    return None if lease is None else lease["token"]


def test_a_live_lease_on_another_machine_is_refused_naming_its_owner(tmp_path) -> None:
    rundir = RunDir(tmp_path / "run")
    _foreign_lease(rundir, heartbeat_age=5)
    with pytest.raises(LeaseHeld, match=r"in use by pid 4242 on host another-machine .*last heartbeat 5s ago"):
        _lease(rundir).acquire()
    assert _holder(rundir) == "theirs"  # untouched


def test_a_silent_lease_is_taken_over_once_older_than_stale_after_s(tmp_path) -> None:
    rundir = RunDir(tmp_path / "run")
    _foreign_lease(rundir, heartbeat_age=0)
    clock = Clock(NOW + 119)
    with pytest.raises(LeaseHeld):
        _lease(rundir, clock).acquire()
    clock.now = NOW + 121
    lease = _lease(rundir, clock).acquire()
    assert _holder(rundir) == lease.owner.token
    lease.release()
    assert read_lease(rundir) is None
    assert GenerationalRecord(rundir.lease_dir).numbers() == [3]  # only the release is kept


def test_a_lease_whose_process_died_on_this_host_is_taken_over_at_once(tmp_path) -> None:
    rundir = RunDir(tmp_path / "run")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = _lease(rundir, host=this_host(), pid=int(gone.stdout))
    dead.acquire()
    dead._stop.set()  # it died: no heartbeat, no release
    lease = _lease(rundir).acquire()
    assert _holder(rundir) == lease.owner.token
    lease.release()


def test_an_earlier_attempt_of_the_same_modal_call_is_taken_over_at_once(tmp_path, monkeypatch) -> None:
    rundir = RunDir(tmp_path / "run")
    _foreign_lease(rundir, heartbeat_age=2, group="fc-123")
    monkeypatch.setenv("NOESIS_LEASE_GROUP", "fc-456")  # another `modal run`: refused
    with pytest.raises(LeaseHeld):
        _lease(rundir).acquire()
    monkeypatch.setenv("NOESIS_LEASE_GROUP", "fc-123")  # a retry of the same call: its predecessor is gone
    lease = _lease(rundir).acquire()
    assert _holder(rundir) == lease.owner.token
    lease.release()


def test_the_heartbeat_renews_and_notices_a_takeover(tmp_path) -> None:
    rundir = RunDir(tmp_path / "run")
    clock = Clock()
    lease = _lease(rundir, clock, stale_after_s=5).acquire()
    clock.now += 1
    assert lease.renew()
    assert (read_lease(rundir) or {}).get("heartbeat") == NOW + 1
    _foreign_lease(rundir, heartbeat_age=0)  # someone else took it
    assert not lease.renew()
    assert lease.lost and "another-machine" in lease.lost
    lease.release()
    assert _holder(rundir) == "theirs"  # not ours to release


def test_a_takeover_between_the_heartbeats_read_and_write_is_reported_not_overwritten(tmp_path) -> None:
    rundir = RunDir(tmp_path / "run")
    lease = _lease(rundir).acquire()
    read = lease.records.current

    def read_then_someone_takes_over():
        seen = read()  # still ours: the heartbeat goes on to write
        _foreign_lease(rundir, heartbeat_age=0)
        return seen

    lease.records.current = read_then_someone_takes_over  # type: ignore[method-assign]
    assert not lease.renew()
    lease.records.current = read  # type: ignore[method-assign]
    assert lease.lost and "pid 4242 on host another-machine" in lease.lost
    assert _holder(rundir) == "theirs"
    lease.release()
    assert _holder(rundir) == "theirs"


def test_of_two_simultaneous_takeovers_exactly_one_wins(tmp_path) -> None:
    rundir = RunDir(tmp_path / "run")
    _foreign_lease(rundir, heartbeat_age=500)  # silent: both may take it over
    first, second = _lease(rundir), _lease(rundir)
    read = first.records.current
    calls = 0

    def read_then_the_other_takes_over():
        nonlocal calls
        calls += 1
        seen = read()
        if calls == 1:  # both have now seen the silent lease; the other writes first
            second.acquire()
        return seen

    first.records.current = read_then_the_other_takes_over  # type: ignore[method-assign]
    with pytest.raises(LeaseHeld, match=r"in use by pid .*last heartbeat 0s ago"):
        first.acquire()
    assert _holder(rundir) == second.owner.token
    assert second.renew()
    second.release()


def test_an_owner_paused_between_read_and_write_cannot_win_after_a_takeover_and_release(tmp_path) -> None:
    rundir = RunDir(tmp_path / "run")
    clock = Clock()
    paused = _lease(rundir, clock).acquire()
    read = paused.records.current

    def read_then_pause_while_another_takes_over_and_finishes():
        seen = read()
        later = Clock(NOW + 500)
        other = _lease(rundir, later, host="another-machine").acquire()
        other.release()
        return seen

    paused.records.current = read_then_pause_while_another_takes_over_and_finishes  # type: ignore[method-assign]
    assert not paused.renew()
    assert paused.lost
    assert read_lease(rundir) is None  # released by the other, not revived by the paused one


def test_only_the_newest_generations_are_kept(tmp_path) -> None:
    rundir = RunDir(tmp_path / "run")
    lease = _lease(rundir).acquire()
    for _ in range(20):
        assert lease.renew()
    assert GenerationalRecord(rundir.lease_dir).numbers() == [21]
    assert os.listdir(rundir.lease_dir) == ["000000000021.json"]
    lease.release()


def test_exactly_one_of_two_swaps_from_the_same_generation_succeeds(tmp_path) -> None:
    records = GenerationalRecord(tmp_path / "lease")
    assert records.swap(0, {"who": "a"})
    assert [records.swap(1, {"who": "b"}), records.swap(1, {"who": "c"})] == [True, False]
    assert records.current().record == {"who": "b"} and records.current().number == 2


def test_without_hard_links_the_swap_is_still_exclusive(tmp_path, monkeypatch) -> None:
    def no_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    records = GenerationalRecord(tmp_path / "lease")
    assert records.swap(0, {"who": "a"})
    assert not records.swap(0, {"who": "b"})
    assert records.current().record == {"who": "a"}
    assert sorted(os.listdir(tmp_path / "lease")) == ["000000000001.json"]  # no temporary file left


def test_an_unreadable_lease_is_taken_over_only_once_it_cannot_be_a_write_in_progress(tmp_path) -> None:
    rundir = RunDir(tmp_path / "run")
    rundir.lease_dir.mkdir(parents=True)
    torn = GenerationalRecord(rundir.lease_dir).path(1)
    torn.write_text('{"host": "another-m')
    written = torn.stat().st_mtime
    with pytest.raises(LeaseHeld, match="at this moment"):
        _lease(rundir, Clock(written + 1)).acquire()
    lease = _lease(rundir, Clock(written + 60)).acquire()
    assert _holder(rundir) == lease.owner.token and lease.generation == 2
    lease.release()


def test_the_heartbeat_thread_renews_until_released(tmp_path) -> None:
    rundir = RunDir(tmp_path / "run")
    lease = RunLease(rundir, stale_after_s=5, heartbeat_s=0.01).acquire()
    deadline = time.monotonic() + 10
    while lease.generation < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lease.generation >= 3 and lease.lost is None
    lease.release()
    assert read_lease(rundir) is None


def test_of_many_threads_swapping_from_one_generation_at_once_exactly_one_wins(tmp_path) -> None:
    records = GenerationalRecord(tmp_path / "lease")
    assert records.swap(0, {"who": "first"})
    start = threading.Barrier(8)
    won: list[int] = []

    def contend(who: int) -> None:
        start.wait()
        if records.swap(1, {"who": who}):
            won.append(who)

    threads = [threading.Thread(target=contend, args=(who,)) for who in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and records.current().record == {"who": won[0]}


def test_a_heartbeat_that_cannot_read_the_lease_stops_and_one_that_cannot_write_goes_on(tmp_path) -> None:
    rundir = RunDir(tmp_path / "run")
    lease = _lease(rundir).acquire()
    swap = lease.records.swap

    def disk_full(expected, record):
        raise OSError(errno.ENOSPC, "No space left on device")

    lease.records.swap = disk_full  # type: ignore[method-assign]
    assert lease.renew() and lease.lost is None  # the lease just ages
    lease.records.swap = swap  # type: ignore[method-assign]

    def unreadable():
        raise OSError(errno.EIO, "Input/output error")

    lease.records.current = unreadable  # type: ignore[method-assign]
    assert not lease.renew()
    assert lease.lost and "cannot be read" in lease.lost
