"""Starting this machine's training processes and supervising them until they stop.

`noesis-train distributed=ddp distributed.num_processes=2` (and the Modal function) call
`launch(cfg, committer)`, which plays torchrun's part with what a run that must not lose work needs:

- every worker trains the parent's exact resolved config (a file), not a re-composition;
- the parent holds the run dir's lease and the storage: worker rank 0 asks it, over a pipe, to
  commit each checkpoint, and it commits once more on every exit path;
- SIGTERM, SIGINT and SIGUSR1 reach each worker exactly once, as a request on its lifeline pipe:
  workers ignore those signals themselves, so a terminal's Ctrl-C or a container runtime that
  signals every process is not counted twice; nobody SIGKILLs them while they checkpoint;
- the workers die with the parent, whatever kills it (a parent-death signal and EOF on the lifeline);
- if one worker fails, the others are stopped, and the caller gets one outcome: the run's result,
  or one exception carrying one line (the workers print nothing of their own about it).
"""

from __future__ import annotations

import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from noesis_accel.config import Config, world_size
from noesis_accel.core.errors import UserError
from noesis_accel.core.protocol import (
    COMMIT_FDS_ENV,
    COMMIT_OK,
    COMMIT_REQUEST,
    CONFIG_ENV,
    LAUNCHER_PID_ENV,
    LEASE_HELD_ENV,
    LIFELINE_FD_ENV,
    OUTCOME_ENV,
    OutcomeKind,
    WorkerOutcome,
    commit_error,
    decode_line,
    encode_line,
    encode_stop_request,
)
from noesis_accel.core.signals import (
    FORWARDED_SIGNALS,
    InterruptedBySignal,
    RunInterrupted,
    StoppedAtDeadline,
    note_stop_signal,
)
from noesis_accel.processes.cluster_watch import ClusterWatch
from noesis_accel.rundir.checkpoint import any_complete_checkpoint
from noesis_accel.rundir.history import RunState, record_stop, write_status
from noesis_accel.rundir.layout import RunDir
from noesis_accel.rundir.lease import LeaseHeld, RunLease, take_run_lease
from noesis_accel.rundir.volumes import Committer
from noesis_accel.training.distributed import free_port, launched_world_size

log = logging.getLogger(__name__)

# How long the other workers may take to stop on their own after one failed, before SIGKILL:
# they are usually blocked in a collective with the dead one and never return from it.
FAILURE_GRACE_S = 10.0
POLL_S = 0.2


class TrainingProcessFailed(Exception):
    """A training process died or failed without a user error: one line, exit code 1, restart resumes.

    `signum`: the stop signal the launcher had received, when the processes died after one (a
    second request forced them out before their checkpoint): the run was stopped, not broken.
    """

    exit_code = 1

    def __init__(self, message: str, signum: int | None = None) -> None:
        super().__init__(message)
        self.signum = signum


class PeerLost(TrainingProcessFailed):
    """Another machine of the cluster stopped answering (cluster_watch.py): a crash, so the cluster is
    started again and resumes from the newest committed checkpoint."""


class WorkerUserError(UserError):
    """A user error raised in a training process, carried to the parent with its exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def needs_launch(cfg: Config) -> bool:
    return world_size(cfg) > 1 and launched_world_size() is None


@dataclass
class _Worker:
    local_rank: int
    rank: int
    process: subprocess.Popen
    outcome_file: Path
    lifeline: int  # our end of its lifeline: stop requests go down it, and our exit closes it

    def request_stop(self, signum: int) -> None:
        try:
            os.write(self.lifeline, encode_stop_request(signum))
        except OSError:  # it has exited already: nothing to stop
            pass

    def outcome(self) -> WorkerOutcome | None:
        """What it reported, or None: killed before it could, or while it wrote."""
        try:
            return WorkerOutcome.from_json(self.outcome_file.read_text())
        except (OSError, ValueError, TypeError):
            return None


class Launcher:
    """One machine's workers for one run: start, forward signals, serve commits, stop, report."""

    def __init__(self, cfg: Config, committer: Committer) -> None:
        self.cfg = cfg
        self.committer = committer
        self.rundir = RunDir.of(cfg.run)
        dist = cfg.distributed
        self.nproc, self.node_rank = dist.num_processes, dist.machine_rank
        self.world = world_size(cfg)
        self.workers: list[_Worker] = []
        self.signals_received: list[int] = []
        self.lease: RunLease | None = None
        self._workdir = Path(tempfile.mkdtemp(prefix="noesis-launch-"))
        self._previous_handlers: dict[int, Any] = {}
        self.watch: ClusterWatch | None = None
        self.peer_lost: str | None = None
        self._first_failure: float | None = None

    # ------------------------------------------------------------ lifecycle

    def run(self) -> dict[str, Any]:
        """Start the workers, supervise them to the end, and return rank 0's result (or raise)."""
        try:
            self._take_lease()
            self._watch_the_cluster()
            self._start_workers()
            self._supervise()
            return self._result()
        finally:
            if self.watch is not None:
                self.watch.stop()
            self._restore_signal_handlers()
            self._stop_all(signal.SIGKILL)  # only reached with workers alive if we failed ourselves
            if self.lease is not None:
                self.lease.release()
            shutil.rmtree(self._workdir, ignore_errors=True)
            # The final commit of what reached the run dir is the caller's (train.run, on every exit path).

    def _take_lease(self) -> None:
        # Only the first machine owns the run dir; on a cluster the others write only their shards.
        if self.node_rank == 0:
            self.lease = take_run_lease(self.rundir, self.cfg.ckpt)

    def _watch_the_cluster(self) -> None:
        """On a cluster, this machine's side of the watch (cluster_watch.py), on the port after the
        rendezvous port of the first machine."""
        dist = self.cfg.distributed
        if dist.num_machines > 1:
            self.watch = ClusterWatch(
                self.node_rank,
                dist.num_machines,
                dist.main_process_ip,
                dist.main_process_port + 1,
                dist.peer_timeout_s,
            ).start()

    def _start_workers(self) -> None:
        config_file = self._workdir / "config.yaml"
        OmegaConf.save(asdict(self.cfg), config_file)  # typed again by the schema in worker.py
        dist = self.cfg.distributed
        single_machine = dist.num_machines == 1
        address = "127.0.0.1" if single_machine else dist.main_process_ip
        port = free_port() if single_machine else dist.main_process_port
        request_read, request_write = os.pipe()
        response_read, self._response_write = os.pipe()
        self._request_read = request_read
        base_env = {
            **os.environ,
            "WORLD_SIZE": str(self.world),
            "LOCAL_WORLD_SIZE": str(self.nproc),
            "GROUP_RANK": str(self.node_rank),
            "MASTER_ADDR": address,
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            CONFIG_ENV: str(config_file),
            LAUNCHER_PID_ENV: str(os.getpid()),
            LEASE_HELD_ENV: "1",
        }
        self._install_signal_handlers()  # before the first worker exists: no signal may be missed
        for local_rank in range(self.nproc):
            rank = self.node_rank * self.nproc + local_rank
            outcome_file = self._workdir / f"rank-{rank}.json"
            lifeline_read, lifeline_write = os.pipe()
            env = {
                **base_env,
                "RANK": str(rank),
                "LOCAL_RANK": str(local_rank),
                OUTCOME_ENV: str(outcome_file),
                LIFELINE_FD_ENV: str(lifeline_read),
            }
            fds = [lifeline_read]
            if local_rank == 0:  # this machine's first worker commits through us
                env[COMMIT_FDS_ENV] = f"{request_write},{response_read}"
                fds += [request_write, response_read]
            process = subprocess.Popen(
                [sys.executable, "-m", "noesis_accel.processes.worker"], env=env, pass_fds=fds, start_new_session=True
            )
            os.close(lifeline_read)  # only this worker reads it: our exit (or close) is its EOF
            self.workers.append(_Worker(local_rank, rank, process, outcome_file, lifeline_write))
        # Only the workers hold these ends now: their exit closes the channel (EOF for us).
        for fd in (request_write, response_read):
            os.close(fd)

    def _supervise(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._request_read, selectors.EVENT_READ)
        requests = os.fdopen(self._request_read, "rb", buffering=0)
        try:
            while any(w.process.poll() is None for w in self.workers):
                for _key, _ in selector.select(timeout=POLL_S):
                    line = requests.readline()
                    if not line:
                        selector.unregister(self._request_read)
                        continue
                    self._serve(decode_line(line))
                if self.lease is not None and self.lease.lost:
                    self._stop_all(signal.SIGKILL)  # another process owns the run dir now: write nothing more
                if self.watch is not None and self.watch.lost and self.peer_lost is None:
                    # Our workers wait in a collective that will never complete: a checkpoint needs the lost
                    # peer too, so the newest committed one stands, and the attempt ends now.
                    self.peer_lost = self.watch.lost
                    log.error("%s; stopping this machine's training processes", self.peer_lost)
                    self._stop_all(signal.SIGKILL)
                failed = [w for w in self.workers if w.process.poll() not in (None, 0)]
                if failed and self._first_failure is None:
                    self._first_failure = time.monotonic()
                if self._first_failure is not None and time.monotonic() - self._first_failure > FAILURE_GRACE_S:
                    self._stop_all(signal.SIGKILL)
        finally:
            selector.close()
            requests.close()
            os.close(self._response_write)
            for worker in self.workers:
                os.close(worker.lifeline)

    def _serve(self, request: str) -> None:
        if request != COMMIT_REQUEST:
            reply = commit_error(f"unknown request {request!r}")
        else:
            try:
                self.committer.commit()
                reply = COMMIT_OK
            except Exception as err:  # reported to the worker, which retries with backoff and logs it
                reply = commit_error(f"{err.__class__.__name__}: {err}")
        os.write(self._response_write, encode_line(reply))

    # ------------------------------------------------------------ signals

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread; the caller forwards then
        for signum in FORWARDED_SIGNALS:
            self._previous_handlers[signum] = signal.signal(signum, self._forward)

    def _restore_signal_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def _forward(self, signum: int, _frame: Any) -> None:
        note_stop_signal()
        self.signals_received.append(signum)
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.request_stop(signum)

    def _stop_all(self, signum: int) -> None:
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.process.send_signal(signum)
        for worker in self.workers:
            try:
                worker.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()

    # ------------------------------------------------------------ the one outcome

    def _result(self) -> dict[str, Any]:
        if all(w.process.returncode == 0 for w in self.workers):
            # Rank 0 reports the run's result; another machine's workers report nothing of it.
            outcome = self.workers[0].outcome()
            return (outcome.result if outcome is not None else None) or {}
        failure = self._failure()
        self._record_failure(failure)
        raise failure

    def _failure(self) -> Exception:
        """The one exception that says why this machine's workers stopped: the one place where the
        workers' outcomes become what the caller sees."""
        if self.lease is not None and self.lease.lost:
            return LeaseHeld(f"{self.lease.lost}; this start stopped its training processes and wrote nothing more")
        if self.watch is not None and self.peer_lost is None and not self.signals_received:
            # Our workers failed: if a peer went silent as they did, it is the cause (its connections reset).
            self.peer_lost = self.watch.silent_peer(self._first_failure or time.monotonic())
        if self.peer_lost is not None:
            return PeerLost(
                f"{self.peer_lost}; this machine's training processes were stopped, and the cluster's next "
                "attempt resumes from the newest committed checkpoint"
            )
        outcomes = {w.rank: w.outcome() for w in self.workers}

        def kind(worker: _Worker) -> OutcomeKind | None:
            outcome = outcomes[worker.rank]
            return outcome.kind if outcome is not None else None

        def when(worker: _Worker) -> float:
            outcome = outcomes[worker.rank]
            return outcome.time if outcome is not None else 0.0

        user_errors = [outcomes[w.rank] for w in self.workers if kind(w) is OutcomeKind.USER_ERROR]
        if user_errors and user_errors[0] is not None:  # the lowest rank's
            return WorkerUserError(user_errors[0].message, user_errors[0].exit_code)
        interrupted = [outcomes[w.rank] for w in self.workers if kind(w) is OutcomeKind.INTERRUPTED]
        if len(interrupted) == len(self.workers) and interrupted[0] is not None:
            return _interruption(interrupted[0], any_complete_checkpoint(self.rundir))
        errors = [w for w in self.workers if kind(w) is OutcomeKind.ERROR]
        if errors:
            # The first rank to fail is the cause; the others failed in a collective with it.
            cause = outcomes[min(errors, key=lambda w: (when(w), w.rank)).rank]
            sys.stderr.write(cause.traceback if cause is not None else "")
            sys.stderr.flush()
        failed = [w for w in self.workers if w.process.returncode != 0]
        first = min(failed, key=lambda w: (kind(w) is not OutcomeKind.ERROR, when(w), w.rank))
        code = first.process.returncode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        if self.signals_received:
            stopped = signal.Signals(self.signals_received[0]).name
            return TrainingProcessFailed(
                f"stopped by {stopped}, but training process rank {first.rank} {how} before its checkpoint "
                "was complete; restart the same command to resume from the newest complete checkpoint",
                signum=self.signals_received[0],
            )
        outcome = outcomes[first.rank]
        detail = outcome.message if outcome is not None else None
        return TrainingProcessFailed(
            f"training process rank {first.rank} {how}"
            + (f" ({detail})" if detail else "")
            + "; restart the same command to resume from the newest complete checkpoint"
        )

    def _record_failure(self, failure: Exception) -> None:
        """We hold the lease, so partial checkpoints are ours to remove; and the stop must be visible.

        Rank 0 records its own stop in status.json, but when it was killed first (or stopped by us
        after another rank failed) status.json would still say `running`.
        """
        if self.node_rank != 0:
            return
        for partial in self.rundir.partial_checkpoints():
            shutil.rmtree(partial, ignore_errors=True)
        status = self.rundir.status()
        if status is not None and isinstance(failure, PeerLost) and status.get("state") != RunState.RUNNING:
            # Rank 0 recorded the collective's error; what happened is the lost peer.
            write_status(self.rundir, exit_reason=str(failure))
        if status is not None and status.get("state") == RunState.RUNNING:
            state = RunState.INTERRUPTED if isinstance(failure, RunInterrupted) else RunState.FAILED
            record_stop(self.rundir, state, int(status.get("step", 0)), str(failure))


def _interruption(outcome: WorkerOutcome, checkpointed: bool) -> RunInterrupted:
    """A worker's interruption rebuilt in the parent, so callers see the exception a single process raises.

    `checkpointed`: the run dir holds a complete checkpoint (a stop before the first one must not claim one).
    """
    if outcome.signum:
        return InterruptedBySignal(outcome.signum, checkpointed)
    if outcome.deadline:
        return StoppedAtDeadline()
    interruption = RunInterrupted(outcome.message or "stopped")
    interruption.exit_code = outcome.exit_code
    return interruption


def launch(cfg: Config, committer: Committer) -> dict[str, Any]:
    """Run `cfg` in `distributed.num_processes` processes on this machine; rank 0's result or raise."""
    return Launcher(cfg, committer).run()
