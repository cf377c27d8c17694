"""The run dir's lease: who may write, and when a lease left behind is taken over."""

from __future__ import annotations

import json
import time

import pytest

from noesis_accel.rundir.layout import RunDir
from noesis_accel.rundir.lease import LeaseHeld, RunLease


def _foreign_lease(rundir: RunDir, heartbeat_age: float, group: str | None = None) -> None:
    rundir.path.mkdir(parents=True, exist_ok=True)
    rundir.lease_file.write_text(
        json.dumps(
            {
                "host": "another-machine",
                "pid": 4242,
                "started": time.time() - 600,
                "token": "theirs",
                "group": group,
                "heartbeat": time.time() - heartbeat_age,
            }
        )
    )


def test_a_live_lease_on_another_machine_is_refused_naming_its_owner(tmp_path) -> None:
    rundir = RunDir(tmp_path / "run")
    _foreign_lease(rundir, heartbeat_age=5)
    with pytest.raises(LeaseHeld, match=r"in use by pid 4242 on host another-machine .*last heartbeat 5s ago"):
        RunLease(rundir, stale_after_s=120, heartbeat_s=10).acquire()
    assert json.loads(rundir.lease_file.read_text())["token"] == "theirs"  # untouched


def test_a_silent_lease_is_taken_over(tmp_path) -> None:
    rundir = RunDir(tmp_path / "run")
    _foreign_lease(rundir, heartbeat_age=500)
    lease = RunLease(rundir, stale_after_s=120, heartbeat_s=10).acquire()
    assert json.loads(rundir.lease_file.read_text())["token"] == lease.owner.token
    lease.release()
    assert not rundir.lease_file.exists()


def test_an_earlier_attempt_of_the_same_modal_call_is_taken_over_at_once(tmp_path, monkeypatch) -> None:
    rundir = RunDir(tmp_path / "run")
    _foreign_lease(rundir, heartbeat_age=2, group="fc-123")
    monkeypatch.setenv("NOESIS_LEASE_GROUP", "fc-456")  # another `modal run`: refused
    with pytest.raises(LeaseHeld):
        RunLease(rundir, stale_after_s=120, heartbeat_s=10).acquire()
    monkeypatch.setenv("NOESIS_LEASE_GROUP", "fc-123")  # a retry of the same call: its predecessor is gone
    lease = RunLease(rundir, stale_after_s=120, heartbeat_s=10).acquire()
    lease.release()


def test_the_heartbeat_renews_and_notices_a_takeover(tmp_path) -> None:
    rundir = RunDir(tmp_path / "run")
    lease = RunLease(rundir, stale_after_s=5, heartbeat_s=0.1).acquire()
    first = json.loads(rundir.lease_file.read_text())["heartbeat"]
    time.sleep(0.5)
    assert json.loads(rundir.lease_file.read_text())["heartbeat"] > first
    _foreign_lease(rundir, heartbeat_age=0)  # someone else took it
    time.sleep(0.5)
    assert lease.lost and "another-machine" in lease.lost
    lease.release()
    assert json.loads(rundir.lease_file.read_text())["token"] == "theirs"  # not ours to remove
