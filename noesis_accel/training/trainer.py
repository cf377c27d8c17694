"""`Trainer`: setup -> train -> finish for one run. I/O policy lives in checkpoint/metrics/status."""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from noesis_accel.config import (
    Resume,
    differing_math_keys,
    fingerprint,
    flatten,
    interval_steps,
    resume_mode,
    uses_deepspeed,
    validate,
)
from noesis_accel.core import env, faults
from noesis_accel.core.errors import ConfigError, DataError, ResumeError, UserError, redact_tree
from noesis_accel.core.signals import (
    ForcedStop,
    InterruptedBySignal,
    PreemptionWatcher,
    RunInterrupted,
    StoppedAtDeadline,
    attempt_deadline,
    deadline_reached,
)
from noesis_accel.rundir.checkpoint import (
    Checkpoint,
    CheckpointManager,
    any_complete_checkpoint,
    refuse_fresh_start_over,
    register_trainable_only_hooks,
)
from noesis_accel.rundir.layout import RunDir, this_host
from noesis_accel.rundir.lease import RunLease, take_run_lease
from noesis_accel.rundir.status import (
    PreviousAttempt,
    attempt_starts,
    lost_steps,
    previous_attempt,
    read_status,
    record_stop,
    write_status,
)
from noesis_accel.rundir.volumes import Committer, LocalCommitter, MirroringCommitter
from noesis_accel.training import data as data_mod
from noesis_accel.training import losses, modeling, optim, packing, probes
from noesis_accel.training.distributed import build_accelerator
from noesis_accel.training.metrics import MetricsLogger, truncate_metrics_after
from noesis_accel.training.sampling import LengthBucketBatchSampler
from noesis_accel.training.trackers import TrackerRun, forget_tracker_run, require_installed, start_tracker

log = logging.getLogger(__name__)

# Work a higher wing runs on the trained model while it is still in memory (eval.after_training):
# called on the main process as (cfg, unwrapped model, tokenizer, held-out records).
AfterTraining = Callable[[DictConfig, Any, Any, Any], object]  # what it returns is not used


@dataclass
class Progress:
    """The trainer's own state, registered for checkpointing: tiny, and enough to continue exactly."""

    step: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    initial_eval_loss: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class RunResult:
    run_dir: Path
    state: str  # completed | already_completed
    step: int
    total_steps: int
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None
    losses: list[float] = field(default_factory=list)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> RunResult:
        """A result reported by a training process as JSON (see worker.py)."""
        return cls(**{**fields, "run_dir": Path(fields["run_dir"])})


class Trainer:
    """One fine-tuning run. Bad flag combinations are rejected in `__init__`, before any loading."""

    # Known from the config alone
    cfg: DictConfig
    committer: MirroringCommitter
    tracker_logs: Path  # where the tracker writes (the run dir's logs/, or a copy's source)
    rundir: RunDir
    run_dir: Path
    progress: Progress
    watcher: PreemptionWatcher
    deadline: float | None  # the attempt's "checkpoint and stop by" time (NOESIS_DEADLINE)
    lease: RunLease | None  # held by this process when no launcher holds it for us
    step_losses: list[float]
    # Built by setup()
    accelerator: Any
    is_deepspeed: bool
    tokenizer: Any
    data: data_mod.PreparedData
    accumulation: int
    loss_scale: int
    label_counts: torch.Tensor
    sampler: LengthBucketBatchSampler
    total_steps: int
    collate: data_mod.PaddingCollator | packing.PackingCollator
    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    trainable_params: list[torch.nn.Parameter]
    gradient_probe: Any
    checkpoints: CheckpointManager
    eval_interval: int
    resumed_from: Checkpoint | None
    metrics: MetricsLogger
    # Main process only, set by _record_starting() and _start_tracker()
    tracker_run: TrackerRun | None  # the tracker run this start logs to (None: train.tracker=none)
    attempt: int  # this attempt's number (1 for the first start of the run)
    last_attempt: PreviousAttempt | None  # how far the attempt before this one got, as committed
    _last_progress_commit: float = 0.0  # time.monotonic() of the newest progress commit

    def __init__(
        self,
        cfg: DictConfig,
        committer: Committer | None = None,
        watcher: PreemptionWatcher | None = None,
        after_training: AfterTraining | None = None,
    ) -> None:
        validate(cfg)
        require_installed(cfg)  # Accelerate would drop a missing tracker without a word
        self.cfg = cfg
        self.after_training = after_training
        self.rundir = RunDir.of(cfg)
        self.run_dir = self.rundir.path
        # The tracker writes off the Volume when told to (its files stay open); each commit copies them in.
        tracker_dir = cfg.train.tracker_dir
        self.tracker_logs = Path(tracker_dir).expanduser() / self.rundir.path.name if tracker_dir else self.rundir.logs
        self.committer = MirroringCommitter(committer or LocalCommitter(), [(self.tracker_logs, self.rundir.logs)])
        self.progress = Progress()
        # A training process started by the launcher gets its stop requests from it (worker.py).
        self.watcher = watcher or PreemptionWatcher()
        self.watcher.on_forced_exit = self._on_forced_exit
        self.deadline = attempt_deadline()
        self.lease = None
        self.accelerator = None
        self.tracker_run = None
        self.step_losses = []
        self._owns_run_dir = False  # set once this start is allowed to write the run dir

    # ================================================================ setup

    def setup(self) -> bool:
        """Build everything and resume if a checkpoint exists. False if the run already completed."""
        cfg = self.cfg
        env.quiet_libraries()
        env.apply_alloc_conf(cfg.env.alloc_conf)
        self.accelerator = accelerator = build_accelerator(cfg, self.tracker_logs)
        self.is_deepspeed = uses_deepspeed(cfg)
        if self._already_completed():
            return False
        self._take_lease()
        self._check_same_config_on_every_machine()
        self._check_run_dir_config()
        if accelerator.is_main_process:  # before loading: an attempt killed while it loads still counts
            self._record_starting()
        self._start_tracker()
        from accelerate.utils import set_seed

        set_seed(int(cfg.train.seed))
        on_cuda = accelerator.device.type == "cuda"

        with accelerator.main_process_first():  # the main process fills the caches, the others read them
            self.tokenizer = modeling.load_tokenizer(cfg.model)
            self.data = data_mod.prepare(cfg.data, self.tokenizer, int(cfg.train.seed))
            model = modeling.build_model(cfg.model, cfg.peft, len(self.tokenizer), on_cuda)
        self.accumulation = accelerator.gradient_accumulation_steps
        self.loss_scale = self.accumulation * accelerator.num_processes
        self.label_counts = torch.as_tensor(self.data.train["label_count"], dtype=torch.long)
        self.sampler = LengthBucketBatchSampler(
            self.data.train["length"],
            micro_batch_size=int(cfg.train.micro_batch_size),
            accumulation=self.accumulation,
            world_size=accelerator.num_processes,
            rank=accelerator.process_index,
            seed=int(cfg.train.seed),
            mega_batch_factor=int(cfg.data.mega_batch_factor),
            max_tokens_per_batch=cfg.data.max_tokens_per_batch,
        )
        self.total_steps = self._total_steps()
        self.collate = packing.build_collator(cfg.data, self.tokenizer.pad_token_id)

        optimizer = optim.build_optimizer(model, cfg.optim, on_cuda)
        scheduler = optim.build_scheduler(optimizer, cfg.optim, self.total_steps)
        self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)
        self.trainable_params = [p for p in self.model.parameters() if p.requires_grad]
        self.gradient_probe = probes.install_gradient_probe(accelerator, self.model, self.is_deepspeed)

        if not self.is_deepspeed:
            register_trainable_only_hooks(accelerator)
        accelerator.register_for_checkpointing(self.progress)
        accelerator.register_for_checkpointing(self.sampler)
        self.checkpoints = CheckpointManager(
            accelerator,
            self.run_dir,
            cfg.ckpt,
            self.total_steps,
            fingerprint(cfg),
            self.committer,
            self.is_deepspeed,
            losses.LOSS_NORMALIZATION,
            num_machines=int(cfg.distributed.num_machines),
        )
        self.eval_interval = interval_steps(float(cfg.train.eval_every), self.total_steps)
        self._resume()
        self.metrics = MetricsLogger(
            accelerator,
            self.run_dir,
            self.total_steps,
            self.progress.step,
            bool(cfg.train.progress_bar),
            cfg.train.print_every,
            tracker_run=self.tracker_run,
        )
        self._announce(model)
        return True

    def _main_decides(self, value: Any) -> Any:
        """Rank 0's answer on every rank: ranks never decide from their own view of shared storage."""
        if self.accelerator.num_processes == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]

    def _on_main_process(self, action: Callable[[], None]) -> None:
        """`action` on the main process only; a user error it raises stops every rank (rank 0 decides)."""
        problem = None
        if self.accelerator.is_main_process:
            try:
                action()
            except UserError as err:
                problem = err
        problem = self._main_decides(problem)
        if problem is not None:
            raise problem

    def _take_lease(self) -> None:
        """One writer per run dir: taken before anything in it is written (unless the launcher holds it)."""

        def take() -> None:
            self.lease = take_run_lease(self.rundir, self.cfg.ckpt)

        self._on_main_process(take)

    def _check_same_config_on_every_machine(self) -> None:
        """On a cluster every machine composes the config itself: all must train the same math."""
        if int(self.cfg.distributed.num_machines) == 1:
            return
        ours = fingerprint(self.cfg)
        if self._main_decides(ours) != ours:
            raise ConfigError(
                f"machine {self.cfg.distributed.machine_rank} composed a config whose math differs from machine 0's "
                "(another code version or other overrides); start every machine with the same command and image"
            )

    def _already_completed(self) -> bool:
        """A completed run asked again: nothing to do, unless the math changed, which is refused by name."""
        status = self._main_decides(read_status(self.run_dir) if self.accelerator.is_main_process else None)
        if status and status.get("state") == "completed" and resume_mode(self.cfg.ckpt.resume) is Resume.AUTO:
            if self.rundir.config_file.is_file():
                changed = self._changed_math(what="a completed run")
                if changed is not None:
                    raise changed
            if self.accelerator.is_main_process:
                print(
                    f"run {self.run_dir} already completed at step {status.get('step')}; nothing to do "
                    "(choose a new run.name to train again)",
                    flush=True,
                )
            return True
        return False

    def _current_config(self) -> dict[str, Any]:
        # Secrets (a token pasted into a path) never reach the file; both sides compare redacted.
        return redact_tree(OmegaConf.to_container(self.cfg, resolve=True))

    def _changed_math(self, what: str) -> ResumeError | None:
        """The refusal to continue the run in the run dir with other math (None: the same math)."""
        saved, current = self.rundir.saved_config(), self._current_config()
        differing = differing_math_keys(saved, current)
        if not differing:
            return None
        old, new = flatten(saved), flatten(current)
        lines = [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in differing]
        return ResumeError(
            f"{self.rundir.path} holds {what} started with a different config; this command must not change "
            "the math. Differing keys:\n  "
            + "\n  ".join(lines)
            + "\nRestore these values, or choose a new run.name for a new run."
        )

    def _check_run_dir_config(self) -> None:
        """A restart must train the same math: compare against the config of the run it continues.

        A run dir without a complete checkpoint has nothing to protect, so there another config
        replaces config.yaml (a start that failed on bad data must not pin its config). Nothing in
        the run dir is written before every refusal has been checked, so a refused start never
        spoils the run it found.
        """
        rundir = self.rundir
        current = self._current_config()
        if resume_mode(self.cfg.ckpt.resume) is Resume.NEVER:
            refuse_fresh_start_over(rundir.checkpoints)
        replace_reason = None
        if not rundir.config_file.is_file() or resume_mode(self.cfg.ckpt.resume) is Resume.NEVER:
            replace_reason = "new"
        else:
            differing = differing_math_keys(rundir.saved_config(), current)
            if differing and not any_complete_checkpoint(rundir):
                replace_reason = (
                    f"it holds no complete checkpoint, so this start's config replaces the one "
                    f"it was started with (differing: {', '.join(differing)})"
                )
            elif differing:
                refusal = self._changed_math(what="a run")
                assert refusal is not None, "the same configs differ in the same keys"
                raise refusal
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            rundir.path.mkdir(parents=True, exist_ok=True)
            if replace_reason is not None:
                forget_tracker_run(rundir)  # other math: its steps are not the old tracker run's
                if replace_reason != "new":
                    print(f"run {rundir.path}: {replace_reason}", flush=True)
                tmp = rundir.config_file.with_suffix(".yaml.tmp")
                tmp.write_text(yaml.safe_dump(current, sort_keys=False))
                os.replace(tmp, rundir.config_file)
        self._owns_run_dir = True

    def _start_tracker(self) -> None:
        """Start the tracker before anything loads (one that cannot start fails in seconds, not after the
        model), continuing the run's tracker run. Main process only; its refusal stops every rank."""

        def start() -> None:
            self.committer.restore()  # on a fresh machine: the tracker's earlier files, where it writes
            self.tracker_run = start_tracker(self.accelerator, self.cfg, self.rundir, self.tracker_logs)

        self._on_main_process(start)

    def _close_tracker(self) -> None:
        """Finish the tracker (it writes its last lines and closes its files) and copy its files into the
        run dir, on every exit path: the final commit then carries all it logged, after a stop too.

        Main process only (the only one holding a tracker). A failure here costs log lines, never the
        run's outcome, so it is a warning.
        """
        accelerator = self.accelerator
        if accelerator is None or not accelerator.is_main_process or not self._owns_run_dir:
            return  # a start refused before it owned the run dir neither started a tracker nor may write there
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

    def _total_steps(self) -> int:
        if self.cfg.train.max_steps:
            first = self.sampler.num_global_batches(0)
        else:
            epochs = float(self.cfg.train.epochs)
            whole = math.floor(epochs)
            counts = [self.sampler.num_global_batches(e) for e in range(math.ceil(epochs))]
            first = counts[0] if counts else 0
            # round() first: 1.1 - 1 is 0.10000000000000009, and ceil would add a step.
            fraction = round(counts[whole] * (epochs - whole), 6) if epochs > whole else 0
            total = sum(counts[:whole]) + math.ceil(fraction)
        if first == 0:
            raise DataError(
                f"data.path: {self.data.stats.train_records} training records cannot fill one global batch of "
                f"{self.cfg.train.global_batch_size}; lower train.global_batch_size or add data"
            )
        return int(self.cfg.train.max_steps) if self.cfg.train.max_steps else max(1, total)

    def _resume(self) -> None:
        self.checkpoints.remove_stale_partials()
        self.accelerator.wait_for_everyone()
        choice: Checkpoint | ResumeError | None = None
        if self.accelerator.is_main_process:
            try:
                choice = self.checkpoints.select_for_resume(str(self.cfg.ckpt.resume))
            except ResumeError as err:
                choice = err
        choice = self._main_decides(choice)
        if isinstance(choice, ResumeError):
            raise choice
        self.resumed_from = checkpoint = choice
        if checkpoint is not None:
            self.checkpoints.load(checkpoint)
        if self.accelerator.is_main_process:
            self._record_start(checkpoint)
            # Steps logged after the resume point (or every step, if nothing was saved) are re-done.
            truncate_metrics_after(self.run_dir, self.progress.step)
            self._commit_progress()
            if checkpoint is not None:
                print(f"resumed from {checkpoint.path} at step {self.progress.step}/{self.total_steps}", flush=True)

    def _record_starting(self) -> None:
        """A `starting` event, committed at once: which attempt this is, and how far the one before got.

        Written before the model loads, so an attempt killed while loading still counts. Read from
        the committed files before this attempt writes anything: the previous attempt's newest
        records, and whether it stopped gracefully (exact) or was killed (a lower bound, unless
        every step it finished was durable as written).
        """
        rundir = self.rundir
        events = rundir.events()
        self.last_attempt = previous = previous_attempt(events, rundir.metrics(), rundir.status())
        event: dict[str, Any] = {
            "attempt": 1 + len(attempt_starts(events)),
            "processes": self.accelerator.num_processes,
            "device": self.accelerator.device.type,
            "host": this_host(),
            "pid": os.getpid(),
            "every_step_durable": _durable_as_written(self.committer) and int(self.cfg.train.log_every) == 1,
        }
        if previous is not None:
            event.update(
                previous_reached=previous.reached,
                previous_reached_exact=previous.exact,
                previous_exit=previous.exit,
                previous_last_seen=previous.last_seen,
            )
        self.attempt = event["attempt"]
        rundir.append_event("starting", **event)
        self._commit_progress()

    def _record_start(self, checkpoint: Checkpoint | None) -> None:
        """A `start` event: the step training starts from, and what the interruption before it cost."""
        event: dict[str, Any] = {
            "attempt": self.attempt,
            "step": self.progress.step,
            "resumed_from": checkpoint.path.name if checkpoint else None,
            "processes": self.accelerator.num_processes,
            "device": self.accelerator.device.type,
            "host": this_host(),
            "pid": os.getpid(),
        }
        previous = self.last_attempt
        if previous is not None:
            event["lost_steps"], event["lost_steps_exact"] = lost_steps(
                previous.reached, previous.exact, self.progress.step
            )
        self.rundir.append_event("start", **event)

    def _progress_commit_hook(self) -> None:
        """Every `ckpt.progress_commit_s`: status.json's step, then a commit of the small progress files.

        So a hard kill's cost is known to within that period: the next attempt reads how far this
        one got from what was committed. Main process only (it holds the committer).
        """
        period = self.cfg.ckpt.progress_commit_s
        if not period or not self.accelerator.is_main_process:
            return
        if time.monotonic() - self._last_progress_commit < float(period):
            return
        write_status(self.run_dir, step=self.progress.step)
        self._commit_progress()

    def _commit_progress(self) -> None:
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

    def _announce(self, model: torch.nn.Module) -> None:
        trainable, total = modeling.count_parameters(model)
        stats = self.data.stats
        self.metrics.write(
            f"run {self.run_dir}: {self.accelerator.num_processes} process(es) on {self.accelerator.device.type}, "
            f"{self.accelerator.distributed_type}; {trainable:,} of {total:,} parameters train; "
            f"{stats.train_records} train / {stats.eval_records} held-out records ({stats.format}), "
            f"{stats.truncated} truncated; {self.total_steps} steps of {self.cfg.train.global_batch_size} "
            f"(micro {self.cfg.train.micro_batch_size} x accumulation {self.accumulation} x "
            f"{self.accelerator.num_processes} process(es)); "
            + (
                f"packed rows (padded would be {100 * self.sampler.padding_fraction(0):.1f}% padding)"
                if self.cfg.data.packing
                else f"padding {100 * self.sampler.padding_fraction(0):.1f}%"
            )
        )
        for line in data_mod.describe(stats):  # every split's counts, and each record truncated or dropped
            self.metrics.write(line)
        for note in data_mod.template_notes(self.tokenizer, self.cfg.data, stats.format):
            self.metrics.write(note)
        if self.accelerator.is_main_process:
            write_status(
                self.run_dir,
                state="running",
                step=self.progress.step,
                total_steps=self.total_steps,
                latest_checkpoint=str(self.resumed_from.path) if self.resumed_from else None,
                exit_reason=None,
                error=None,
            )

    # ================================================================ train

    def train(self) -> None:
        """The loop: batch -> forward -> backward -> step -> checkpoint hook -> log, until total steps."""
        progress = self.progress
        if progress.step == 0 and progress.initial_eval_loss is None and len(self.data.eval):
            progress.initial_eval_loss = self.evaluate()
            self.metrics.write(f"held-out loss before training: {progress.initial_eval_loss:.4f}")
        self.model.train()
        while progress.step < self.total_steps:
            finished_epoch = self._train_epoch()
            if finished_epoch:
                self.sampler.set_epoch(self.sampler.epoch + 1, 0)

    def _train_epoch(self) -> bool:
        """Train from the sampler's position; True if the epoch's batches ran out."""
        loader = torch.utils.data.DataLoader(
            self.data.train,
            batch_sampler=list(self.sampler),
            collate_fn=self.collate,
            num_workers=int(self.cfg.data.num_workers),
            pin_memory=self.accelerator.device.type == "cuda",
            # A private generator: creating the loader must not draw from the global RNG that dropout
            # uses, or a resumed run (one extra loader) would diverge from an uninterrupted one.
            generator=torch.Generator().manual_seed(int(self.cfg.train.seed)),
        )
        step_loss, step_samples, step_tokens = None, 0, 0
        for batch in loader:
            if step_loss is None:  # the first micro-batch of an optimizer step
                label_tokens = self._global_batch_label_tokens()
            # Counted on the host before the copy, so the loop never waits for the GPU to report them.
            samples, tokens = packing.records_and_tokens(batch)
            batch = {k: v.to(self.accelerator.device, non_blocking=True) for k, v in batch.items()}
            loss, grad_norm = self._micro_step(batch, label_tokens)
            step_loss = loss if step_loss is None else step_loss + loss
            step_samples += samples
            step_tokens += tokens
            self.metrics.count_tokens(tokens * self.accelerator.num_processes)
            if not self.accelerator.sync_gradients:
                continue
            self._after_optimizer_step(float(step_loss), grad_norm, step_samples, step_tokens)
            step_loss, step_samples, step_tokens = None, 0, 0
            if self.progress.step >= self.total_steps:
                return False
        return True

    def _global_batch_label_tokens(self) -> int:
        """Label tokens in the whole global batch about to be trained (every micro-batch, every rank).

        The sampler's plan is the same on every rank, so each rank knows the count before its first
        backward, with no communication.
        """
        return int(self.label_counts[self.sampler.current_global_batch()].sum())

    def _micro_step(self, batch: dict[str, torch.Tensor], label_tokens: int) -> tuple[torch.Tensor, float | None]:
        """Forward and backward of one micro-batch; on the last one of a step also clip and step.

        Returns this micro-batch's share of the global-batch loss (summed token losses / label tokens
        of the global batch): the shares of every micro-batch on every rank add up to the loss.
        """
        accelerator, grad_norm = self.accelerator, None
        with accelerator.accumulate(self.model):
            loss = losses.micro_batch_loss(self.model, batch, label_tokens)
            # Accelerate (or DeepSpeed) divides by the accumulation steps and DDP/ZeRO average over the
            # processes; scaling by both first leaves exactly the sum over the global batch / its tokens.
            accelerator.backward(loss * self.loss_scale)
            if accelerator.sync_gradients and self.gradient_probe is not None:
                self.gradient_probe(self.progress.step + 1)
            if accelerator.sync_gradients and self.cfg.optim.max_grad_norm > 0:
                norm = accelerator.clip_grad_norm_(self.trainable_params, float(self.cfg.optim.max_grad_norm))
                grad_norm = float(norm) if norm is not None else None
            self.optimizer.step()
            if accelerator.sync_gradients:
                self.scheduler.step()  # once per optimizer step (a no-op wrapper under DeepSpeed, which steps it)
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), grad_norm

    def _after_optimizer_step(self, loss: float, grad_norm: float | None, samples: int, tokens: int) -> None:
        progress, cfg = self.progress, self.cfg
        progress.step += 1
        self.sampler.advance()
        world = self.accelerator.num_processes
        if world > 1:
            reduced = self.accelerator.reduce(
                torch.tensor([loss, samples, tokens], dtype=torch.float64, device=self.accelerator.device),
                reduction="sum",
            )
            loss, samples, tokens = float(reduced[0]), int(reduced[1]), int(reduced[2])  # shares add up
        progress.samples_seen += samples
        progress.tokens_seen += tokens
        self.step_losses.append(loss)
        lr = self.scheduler.get_last_lr()[0]
        if progress.step % int(cfg.train.log_every) == 0 or progress.step == self.total_steps:
            tokens_per_s = self.metrics.tokens_per_second()
            values = {
                "loss": loss,
                "lr": lr,
                "epoch": self.sampler.epoch,
                "tokens_per_s": tokens_per_s,
                "samples_seen": progress.samples_seen,
                "tokens_seen": progress.tokens_seen,
            }
            if grad_norm is not None:
                values["grad_norm"] = grad_norm
            if self.accelerator.device.type == "cuda":  # the allocator's own counter: no device sync
                values["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            self.metrics.log(progress.step, values)
            self.metrics.progress(progress.step, loss, lr, tokens_per_s)
        if (
            self.eval_interval
            and len(self.data.eval)
            and progress.step % self.eval_interval == 0
            and progress.step < self.total_steps
        ):  # no held-out set, no held-out loss (not a NaN)
            eval_loss = self.evaluate()
            self.metrics.log(progress.step, {"eval_loss": eval_loss})
            self.metrics.write(f"step {progress.step}: held-out loss {eval_loss:.4f}")
            self.model.train()
        self._checkpoint_hook()
        self._progress_commit_hook()

    def _checkpoint_hook(self) -> None:
        """Save when due (interval, minutes, signal, deadline, final); after a stop request, stop once saved."""
        faults.maybe_inject("step", self.progress.step)
        faults.maybe_inject("term", self.progress.step)
        faults.maybe_inject("usr1", self.progress.step)
        if self.lease is not None and self.lease.lost:
            raise ResumeError(f"{self.lease.lost}; this start stops without writing more")
        signal_received, minutes_due, deadline_due = self._agreed_flags()
        reason = self.checkpoints.due(self.progress.step, signal_received, minutes_due, deadline_due)
        if reason is None:
            return
        progress = {
            "epoch": self.sampler.epoch,
            "position_in_epoch": self.sampler.position,
            "samples_seen": self.progress.samples_seen,
            "tokens_seen": self.progress.tokens_seen,
            "total_steps": self.total_steps,
        }
        started = time.monotonic()
        self.watcher.saving = reason in ("signal", "deadline")
        try:
            path = self.checkpoints.save(self.progress.step, reason, progress)
        finally:
            self.watcher.saving = False
        if self.accelerator.is_main_process:
            self.rundir.append_event(
                "checkpoint",
                step=self.progress.step,
                reason=reason,
                name=path.name,
                seconds=round(time.monotonic() - started, 3),
            )
            write_status(self.run_dir, state="running", step=self.progress.step, latest_checkpoint=str(path))
            self.metrics.write(f"step {self.progress.step}: checkpoint {path.name} ({reason})")
        if reason == "signal":
            raise InterruptedBySignal(self.watcher.received or 15)
        if reason == "deadline":
            raise StoppedAtDeadline()

    def _agreed_flags(self) -> tuple[bool, bool, bool]:
        """Signal, wall-clock and deadline triggers, agreed across ranks so every rank saves at the same step."""
        flags = [
            float(self.watcher.requested),
            float(self.checkpoints.minutes_elapsed_due()),
            float(deadline_reached(self.deadline)),
        ]
        if self.accelerator.num_processes > 1:
            tensor = torch.tensor(flags, device=self.accelerator.device)
            flags = self.accelerator.reduce(tensor, reduction="sum").tolist()
        return flags[0] > 0, flags[1] > 0, flags[2] > 0

    def evaluate(self) -> float:
        """Held-out loss (token-weighted, the quantity the training loss logs), sharded across ranks."""
        accelerator = self.accelerator
        reduce_sum = (lambda t: accelerator.reduce(t, reduction="sum")) if accelerator.num_processes > 1 else None
        # The unwrapped model: no collectives inside an eval forward.
        return losses.heldout_loss(
            accelerator.unwrap_model(self.model),
            self.data.eval,
            self.collate,
            int(self.cfg.train.micro_batch_size),
            accelerator.device,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            autocast=accelerator.autocast,
            reduce_sum=reduce_sum,
        )

    # ================================================================ finish

    def finish(self) -> RunResult:
        """Held-out loss after training, the final adapter and tokenizer, status `completed`."""
        accelerator = self.accelerator
        eval_after = self.evaluate() if len(self.data.eval) else None
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            target = self.rundir.final_weights_dir(bool(self.cfg.peft.enabled))
            accelerator.unwrap_model(self.model).save_pretrained(str(target), safe_serialization=True)
            self.tokenizer.save_pretrained(str(target))
            before = self.progress.initial_eval_loss
            if eval_after is not None:
                self.metrics.log(self.progress.step, {"eval_loss": eval_after})
                before_text = f"{before:.4f}" if before is not None else "n/a"
                self.metrics.write(f"held-out loss: before {before_text} -> after {eval_after:.4f}")
            self.metrics.write(f"saved {target}")
            if self.cfg.train.sample_prompt:
                from noesis_accel.training.generate import reply

                answer = reply(accelerator.unwrap_model(self.model), self.tokenizer, self.cfg.train.sample_prompt)
                self.metrics.write(f"sample: {self.cfg.train.sample_prompt!r} -> {answer!r}")
            write_status(self.run_dir, eval_loss_before=before, eval_loss_after=eval_after)
            record_stop(self.rundir, "completed", self.progress.step, "completed")
        self.metrics.close()
        after_training = self.after_training if accelerator.is_main_process else None
        accelerator.wait_for_everyone()
        self._close_tracker()
        accelerator.end_training()  # also tears down the process group: nothing collective after it
        if after_training is not None:  # after end_training, so the other processes are not held at a barrier meanwhile
            after_training(self.cfg, accelerator.unwrap_model(self.model), self.tokenizer, self.data.eval)
        return RunResult(
            self.run_dir,
            "completed",
            self.progress.step,
            self.total_steps,
            self.progress.initial_eval_loss,
            eval_after,
            list(self.step_losses),
        )

    def _on_forced_exit(self, signum: int) -> None:
        self._record_exit("interrupted", f"{signal.Signals(signum).name} again: stopped at once, before a checkpoint")

    # ================================================================ lifecycle

    def run(self) -> RunResult:
        """setup -> train -> finish, recording in status.json how and why the run ended."""
        # Installed first: a preemption while the model loads is honoured as soon as it is safe.
        self.watcher.install()
        try:
            if not self.setup():
                status = read_status(self.run_dir) or {}
                return RunResult(
                    self.run_dir, "already_completed", int(status.get("step", 0)), int(status.get("total_steps", 0))
                )
            if self.watcher.requested:  # during setup: nothing new to save, the resume point stands
                raise InterruptedBySignal(self.watcher.received or signal.SIGTERM)
            self.train()
            return self.finish()
        except RunInterrupted as stop:
            self._record_exit("interrupted", str(stop))
            raise
        except ForcedStop:
            raise  # recorded by _on_forced_exit, before the stop unwound anything
        except UserError as err:
            self._record_exit("failed", str(err))
            raise
        except BaseException as err:
            self._record_exit("failed", f"{err.__class__.__name__}: {err}")
            raise
        finally:
            self._close_tracker()  # before the caller's final commit, which then carries its files
            # Also after a stop or a failure: the next run in this process (a sweep job, a test)
            # must not have its signals routed to this finished trainer.
            self.watcher.uninstall()
            if self.lease is not None:
                self.lease.release()
            _reset_accelerate_state()

    def _record_exit(self, state: str, reason: str) -> None:
        if self._owns_run_dir and self.accelerator is not None and self.accelerator.is_main_process:
            record_stop(self.rundir, state, self.progress.step, reason)


def _durable_as_written(committer: Committer) -> bool:
    """Whether what is written under the run dir lasts with no commit (a local disk, not a Volume)."""
    inner = getattr(committer, "inner", committer)  # a wrapper (the tracker-log mirror) commits through `inner`
    return isinstance(inner, LocalCommitter)


def _reset_accelerate_state() -> None:
    """Accelerate keeps its state in process-wide singletons; the next run in this process (a sweep
    job, a test) may want another precision or device, so each run leaves them clean."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
