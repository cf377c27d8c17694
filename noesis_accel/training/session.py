"""`RunSession`: this run on disk, opened before the model loads and closed on every exit path.

It owns the run dir, the lease, the config guard (a completed run asked again, a restart that would
change the math, the atomic config.yaml), the attempt accounting (`starting` and `start` events),
the status writes, the progress commits and the tracker run. The `Trainer` gets an open session and
only trains; nothing here needs the model.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from noesis_accel.config import Config, Resume, differing_math_keys, fingerprint, flatten, resume_mode
from noesis_accel.core.collective import main_decides, on_main_process
from noesis_accel.core.errors import ConfigError, ResumeError, UserError, redact_tree
from noesis_accel.core.signals import ForcedStop, RunInterrupted
from noesis_accel.rundir.checkpoint import Checkpoint, any_complete_checkpoint, refuse_fresh_start_over
from noesis_accel.rundir.history import (
    CheckpointEvent,
    PreviousAttempt,
    RunState,
    StartEvent,
    StartingEvent,
    append_event,
    attempt_starts,
    lost_steps,
    previous_attempt,
    read_status,
    record_stop,
    write_status,
)
from noesis_accel.rundir.layout import RunDir, this_host
from noesis_accel.rundir.lease import RunLease, take_run_lease
from noesis_accel.rundir.logrestore import restore_cut_events
from noesis_accel.rundir.volumes import Committer, LocalCommitter, MirroringCommitter
from noesis_accel.training.oom import OutOfMemory, OutOfMemoryCrash
from noesis_accel.training.trackers import TrackerRun, forget_tracker_run, start_tracker

log = logging.getLogger(__name__)


def tracker_logs_dir(cfg: Config, rundir: RunDir) -> Path:
    """Where the tracker writes: the run dir's logs/, or off the Volume when `train.tracker_dir` says so
    (its files stay open there); each commit copies them in."""
    tracker_dir = cfg.train.tracker_dir
    return Path(tracker_dir).expanduser() / rundir.path.name if tracker_dir else rundir.logs


def device_name(accelerator: Any) -> str | None:
    """The CUDA device name this process trains on (what prices the attempt); None on the CPU."""
    if accelerator.device.type != "cuda":
        return None
    import torch

    return str(torch.cuda.get_device_name(accelerator.device))


def mirroring_committer(committer: Committer | None, tracker_logs: Path, rundir: RunDir) -> MirroringCommitter:
    return MirroringCommitter(committer or LocalCommitter(), [(tracker_logs, rundir.logs)])


# ---------------------------------------------------------------- the config guard


def _current_config(cfg: Config) -> dict[str, Any]:
    # Secrets (a token pasted into a path) never reach the file; both sides compare redacted.
    # `asdict` holds what OmegaConf's resolved container of the composed config held, in the schema's order.
    return redact_tree(asdict(cfg))


def _changed_math(cfg: Config, rundir: RunDir, what: str) -> ResumeError | None:
    """The refusal to continue the run in the run dir with other math (None: the same math)."""
    saved, current = rundir.saved_config(), _current_config(cfg)
    differing = differing_math_keys(saved, current)
    if not differing:
        return None
    old, new = flatten(saved), flatten(current)
    lines = [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in differing]
    return ResumeError(
        f"{rundir.path} holds {what} started with a different config; this command must not change "
        "the math. Differing keys:\n  "
        + "\n  ".join(lines)
        + "\nRestore these values, or choose a new run.name for a new run."
    )


def already_completed(cfg: Config, accelerator: Any, rundir: RunDir) -> dict[str, Any] | None:
    """The status of a completed run asked again (nothing to do), unless the math changed, which is
    refused by name; None when there is training to do."""
    status = main_decides(accelerator, lambda: read_status(rundir.path))
    if not (status and status.get("state") == RunState.COMPLETED and resume_mode(cfg.ckpt.resume) is Resume.AUTO):
        return None
    if rundir.config_file.is_file():
        changed = _changed_math(cfg, rundir, what="a completed run")
        if changed is not None:
            raise changed
    if accelerator.is_main_process:
        print(
            f"run {rundir.path} already completed at step {status.get('step')}; nothing to do "
            "(choose a new run.name to train again)",
            flush=True,
        )
    return status


def _check_same_config_on_every_machine(cfg: Config, accelerator: Any) -> None:
    """On a cluster every machine composes the config itself: all must train the same math."""
    if cfg.distributed.num_machines == 1:
        return
    ours = fingerprint(asdict(cfg))
    if main_decides(accelerator, lambda: ours) != ours:
        raise ConfigError(
            f"machine {cfg.distributed.machine_rank} composed a config whose math differs from machine 0's "
            "(another code version or other overrides); start every machine with the same command and image"
        )


def _guard_run_dir_config(cfg: Config, accelerator: Any, rundir: RunDir) -> None:
    """A restart must train the same math: compare against the config of the run it continues.

    A run dir without a complete checkpoint has nothing to protect, so there another config
    replaces config.yaml (a start that failed on bad data must not pin its config). Nothing in
    the run dir is written before every refusal has been checked, so a refused start never
    spoils the run it found.
    """
    current = _current_config(cfg)
    if resume_mode(cfg.ckpt.resume) is Resume.NEVER:
        refuse_fresh_start_over(rundir.checkpoints)
    replace_reason = None
    if not rundir.config_file.is_file() or resume_mode(cfg.ckpt.resume) is Resume.NEVER:
        replace_reason = "new"
    else:
        differing = differing_math_keys(rundir.saved_config(), current)
        if differing and not any_complete_checkpoint(rundir):
            replace_reason = (
                f"it holds no complete checkpoint, so this start's config replaces the one "
                f"it was started with (differing: {', '.join(differing)})"
            )
        elif differing:
            raise _changed_math(cfg, rundir, what="a run")  # type: ignore[misc]
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        rundir.path.mkdir(parents=True, exist_ok=True)
        if replace_reason is not None:
            forget_tracker_run(rundir)  # other math: its steps are not the old tracker run's
            if replace_reason != "new":
                print(f"run {rundir.path}: {replace_reason}", flush=True)
            tmp = rundir.config_file.with_suffix(".yaml.tmp")
            tmp.write_text(yaml.safe_dump(current, sort_keys=False))
            os.replace(tmp, rundir.config_file)
            rundir.write_command()  # the command that started this config; a continuation keeps it


# ---------------------------------------------------------------- the session


def _durable_as_written(committer: Committer) -> bool:
    """Whether what is written under the run dir lasts with no commit (a local disk, not a Volume)."""
    inner = getattr(committer, "inner", committer)  # a wrapper (the tracker-log mirror) commits through `inner`
    return isinstance(inner, LocalCommitter)


def exit_record(err: BaseException) -> tuple[RunState, str] | None:
    """(state, reason) to record for an attempt ended by `err`; None when it is recorded already."""
    if isinstance(err, ForcedStop):
        return None  # recorded by the forced-exit hook, before the stop unwound anything
    if isinstance(err, RunInterrupted):
        return RunState.INTERRUPTED, str(err)
    if isinstance(err, UserError):
        return RunState.FAILED, str(err)
    return RunState.FAILED, f"{err.__class__.__name__}: {err}"


class RunSession:
    """This start's hold on its run dir. `open` takes it (or refuses, writing nothing); `close` lets go.

    Writes happen on the main process only; every rank holds a session and takes part in its
    collective decisions.
    """

    def __init__(
        self,
        cfg: Config,
        accelerator: Any,
        rundir: RunDir,
        committer: MirroringCommitter,
        tracker_logs: Path,
        lease: RunLease | None,
    ) -> None:
        """A session over a run dir this start now owns (see `open`): the lease held, the config guarded."""
        self.cfg = cfg
        self.accelerator = accelerator
        self.rundir = rundir
        self.committer = committer
        self.tracker_logs = tracker_logs
        self.lease = lease  # held by this process when no launcher holds it for us
        self.is_main = bool(accelerator.is_main_process)
        self.step = 0  # the step this attempt starts from (known once a checkpoint is chosen), for a stop record
        self.training_started = False  # its `start` recorded: from then on a stop ends an attempt, not a failed start
        self._last_progress_commit = 0.0  # time.monotonic() of the newest progress commit
        self._closed = False
        try:
            if self.is_main:  # before the history is read: attempts the Volume cut off still count
                restore_cut_events(rundir)
            # Before the model loads, so an attempt killed while it loads still counts.
            self.attempt, self.last_attempt = self._record_starting() if self.is_main else (0, None)
            self.tracker_run = self._start_tracker()
        except BaseException as err:  # the run dir is ours already: say how this start ended, and let go
            self.record_exit(err)
            self.close()
            raise

    @classmethod
    def open(cls, cfg: Config, accelerator: Any, committer: MirroringCommitter, tracker_logs: Path) -> RunSession:
        """Take the run dir: the lease first, then every refusal, and only then writes.

        A start refused before it wrote config.yaml leaves the run dir as it found it (and records
        nothing there); one that fails after records how it stopped.
        """
        rundir = RunDir.of(cfg.run)
        # One writer per run dir: taken before anything in it is written (unless the launcher holds it).
        lease = on_main_process(accelerator, lambda: take_run_lease(rundir, cfg.ckpt))
        try:
            _check_same_config_on_every_machine(cfg, accelerator)
            _guard_run_dir_config(cfg, accelerator, rundir)
        except BaseException:
            if lease is not None:
                lease.release()
            raise
        return cls(cfg, accelerator, rundir, committer, tracker_logs, lease)

    # ------------------------------------------------------------ attempts

    def _record_starting(self) -> tuple[int, PreviousAttempt | None]:
        """A `starting` event, committed at once: which attempt this is, and how far the one before got
        (failed starts are no attempts: the one before is the last that was one).

        Read from the committed files before this attempt writes anything: the previous attempt's
        newest records, and whether it stopped gracefully (exact) or was killed (a lower bound,
        unless every step it finished was durable as written).
        """
        rundir = self.rundir
        events = rundir.events()
        previous = previous_attempt(events, rundir.metrics(), rundir.status())
        attempt = 1 + len(attempt_starts(events))
        starting = StartingEvent(
            attempt=attempt,
            processes=self.accelerator.num_processes,
            device=self.accelerator.device.type,
            host=this_host(),
            pid=os.getpid(),
            every_step_durable=_durable_as_written(self.committer) and self.cfg.train.log_every == 1,
            previous=previous,
            gpu=device_name(self.accelerator),
        )
        append_event(rundir, starting)
        self.commit_progress()
        return attempt, previous

    def record_start(
        self,
        checkpoint: Checkpoint | None,
        step: int,
        checkpoint_processes: int | None = None,
        optimizer_reset: bool = False,
    ) -> None:
        """A `start` event (main process): the step training starts from, what the interruption before it
        cost, and the process count the checkpoint was written by when this attempt runs another."""
        self.step = step
        start = StartEvent(
            attempt=self.attempt,
            step=step,
            resumed_from=checkpoint.path.name if checkpoint else None,
            processes=self.accelerator.num_processes,
            device=self.accelerator.device.type,
            host=this_host(),
            pid=os.getpid(),
            checkpoint_processes=checkpoint_processes,
            optimizer_reset=optimizer_reset,
        )
        previous = self.last_attempt
        if previous is not None:
            start.lost_steps, start.lost_steps_exact = lost_steps(previous.reached, previous.exact, step)
        append_event(self.rundir, start)
        self.training_started = True

    def check_lease(self) -> None:
        """Stop before writing more once another process has taken the run dir over."""
        if self.lease is not None and self.lease.lost:
            raise ResumeError(f"{self.lease.lost}; this start stops without writing more")

    # ------------------------------------------------------------ status (main process only)

    def record_running(self, step: int, total_steps: int, latest_checkpoint: Path | None) -> None:
        if self.is_main:
            write_status(
                self.rundir,
                state=RunState.RUNNING,
                step=step,
                total_steps=total_steps,
                latest_checkpoint=str(latest_checkpoint) if latest_checkpoint else None,
                exit_reason=None,
                error=None,
            )

    def record_checkpoint(self, step: int, reason: str, path: Path, seconds: float) -> None:
        if self.is_main:
            checkpoint = CheckpointEvent(step=step, name=path.name, reason=reason, seconds=round(seconds, 3))
            append_event(self.rundir, checkpoint)
            write_status(self.rundir, state=RunState.RUNNING, step=step, latest_checkpoint=str(path))

    def record_first_step(self, record: dict[str, Any]) -> None:
        if self.is_main:
            write_status(self.rundir, **record)

    def record_completed(self, step: int, eval_before: float | None, eval_after: float | None) -> None:
        if self.is_main:
            write_status(self.rundir, eval_loss_before=eval_before, eval_loss_after=eval_after)
            record_stop(self.rundir, RunState.COMPLETED, step, "completed")

    def record_exit(self, err: BaseException, step: int | None = None) -> None:
        """How this attempt ended, for an attempt ended by `err` at `step` (default: the step it started from).

        A user error before training started (bad config or data, a refused resume) makes it a failed
        start: the user fixes the command, and the run's history counts no attempt and no interruption.
        """
        record = exit_record(err)
        if record is not None:
            self.record_stop(
                *record,
                step=step,
                out_of_memory=isinstance(err, (OutOfMemory, OutOfMemoryCrash)),
                failed_start=isinstance(err, UserError) and not self.training_started,
            )

    def record_stop(
        self,
        state: RunState,
        reason: str,
        step: int | None = None,
        out_of_memory: bool = False,
        failed_start: bool = False,
        **status: Any,
    ) -> None:
        if self.is_main:
            at = self.step if step is None else step
            record_stop(self.rundir, state, at, reason, out_of_memory, failed_start, **status)

    def record_forced_exit(self, signum: int, step: int | None = None) -> None:
        reason = f"{signal.Signals(signum).name} again: stopped at once, before a checkpoint"
        self.record_stop(RunState.INTERRUPTED, reason, step)

    # ------------------------------------------------------------ progress commits (main process only)

    def progress_commit_hook(self, step: int, **status: Any) -> None:
        """Every `ckpt.progress_commit_s`: status.json's step, then a commit of the small progress files.

        So a hard kill's cost is known to within that period: the next attempt reads how far this
        one got from what was committed.
        """
        period = self.cfg.ckpt.progress_commit_s
        if not period or not self.is_main:
            return
        if time.monotonic() - self._last_progress_commit < period:
            return
        write_status(self.rundir.path, step=step, **status)
        self.commit_progress()

    def commit_progress(self) -> None:
        """Commit what the run dir holds now; a failure costs only precision, so it is a warning."""
        if not self.cfg.ckpt.progress_commit_s:
            return
        self._last_progress_commit = time.monotonic()
        try:
            self.committer.commit()
        except Exception as err:  # any storage backend's error; the next checkpoint commit retries anyway
            log.warning(
                "could not commit the run's progress files (%s); training goes on, but a hard kill "
                "now may be reported as costing fewer steps than it did",
                err,
            )

    # ------------------------------------------------------------ the tracker

    def _start_tracker(self) -> TrackerRun | None:
        """Start the tracker before anything loads (one that cannot start fails in seconds, not after the
        model), continuing the run's tracker run. Main process only; its refusal stops every rank."""

        def start() -> TrackerRun | None:
            self.committer.restore()  # on a fresh machine: the tracker's earlier files, where it writes
            return start_tracker(self.accelerator, self.cfg, self.rundir, self.tracker_logs)

        return on_main_process(self.accelerator, start)

    def close_tracker(self) -> None:
        """Finish the tracker (it writes its last lines and closes its files) and copy its files into the
        run dir, on every exit path: the final commit then carries all it logged, after a stop too.

        Main process only (the only one holding a tracker). A failure here costs log lines, never the
        run's outcome, so it is a warning.
        """
        if not self.is_main:
            return
        accelerator = self.accelerator
        trackers, accelerator.trackers = list(accelerator.trackers), []
        for tracker in trackers:
            try:
                tracker.finish()
            except Exception as err:  # any tracker's error
                log.warning("the %s tracker did not close cleanly: %s", tracker.name, err)
        try:
            self.committer.sync()
        except OSError as err:
            log.warning("could not copy the tracker's files into the run dir: %s", err)

    def close(self) -> None:
        """The tracker's files into the run dir (before the caller's final commit carries them), the lease let go."""
        if self._closed:
            return
        self._closed = True
        self.close_tracker()
        if self.lease is not None:
            self.lease.release()
