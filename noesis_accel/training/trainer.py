"""`Trainer`: train -> finish for one run, on an open `RunSession` (the run on disk: session.py).
I/O policy lives in checkpoint/metrics/status."""

from __future__ import annotations

import logging
import resource
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch

from noesis_accel.config import Config, check_config, fingerprint, interval_steps
from noesis_accel.core import env, faults
from noesis_accel.core.collective import main_decides
from noesis_accel.core.errors import DataError, ResumeError
from noesis_accel.core.signals import (
    InterruptedBySignal,
    PreemptionWatcher,
    StoppedAtDeadline,
    attempt_deadline,
    deadline_reached,
)
from noesis_accel.rundir.checkpoint import Checkpoint, CheckpointManager
from noesis_accel.rundir.costs import format_usd
from noesis_accel.rundir.history import RunState, failed_starts, history, out_of_memory_stops
from noesis_accel.rundir.layout import RunDir
from noesis_accel.rundir.logrestore import restore_cut_metrics
from noesis_accel.rundir.volumes import Committer
from noesis_accel.training import data as data_mod
from noesis_accel.training import losses, modeling, optim, packing, probes
from noesis_accel.training.distributed import build_accelerator
from noesis_accel.training.metrics import MetricsLogger, truncate_metrics_after
from noesis_accel.training.oom import out_of_memory
from noesis_accel.training.plan import make_plan, write_plan
from noesis_accel.training.sampling import LengthBucketBatchSampler, planned_steps
from noesis_accel.training.session import (
    RunSession,
    already_completed,
    device_name,
    mirroring_committer,
    tracker_logs_dir,
)
from noesis_accel.training.spend import Spend
from noesis_accel.training.strategies import Strategy, build_strategy
from noesis_accel.training.trackers import require_installed

log = logging.getLogger(__name__)
BUDGET_MARGIN = 2.0  # the next step and save are priced at twice their slowest recent time (_over_budget)

# Work a higher wing runs on the trained model while it is still in memory (eval.after_training):
# called on the main process as (cfg, unwrapped model, tokenizer, held-out records).
AfterTraining = Callable[[Config, Any, Any, Any], object]  # what it returns is not used


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
    state: RunState  # completed | already_completed
    step: int
    total_steps: int
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None
    losses: list[float] = field(default_factory=list)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> RunResult:
        """A result reported by a training process as JSON (see worker.py)."""
        return cls(**{**fields, "run_dir": Path(fields["run_dir"])})


class BudgetReached(Exception):
    """One more step and a checkpoint would pass `budget.usd`: the run stops (after a checkpoint, when it trained)."""

    def __init__(self, step: int, total_steps: int, spent: float, cap: float) -> None:
        # Over already: the start-up (or a save slower than any before it) cost more than was left.
        how = "before passing the budget" if spent <= cap else "at the budget (start-up and saves included)"
        super().__init__(
            f"stopped at step {step} {how}: {format_usd(spent)} spent of "
            f"budget.usd={format_usd(cap)}; restart with a higher budget.usd to continue from here"
        )
        self.step, self.total_steps, self.spent, self.cap = step, total_steps, spent, cap


class Trainer:
    """One fine-tuning run's training, on an open `RunSession`: complete once constructed (the model
    loaded, the checkpoint resumed), then `run()` trains and finishes.

    `Trainer.run_config` is the whole start (session, trainer, train, finish, how it ended);
    `Trainer.for_config` a complete trainer for a caller that drives `train()` itself.
    """

    def __init__(
        self,
        session: RunSession,
        strategy: Strategy,
        watcher: PreemptionWatcher | None = None,
        after_training: AfterTraining | None = None,
    ) -> None:
        """Load tokenizer, data and model, prepare them, resume, and announce the run (`strategy`: the one
        the session's Accelerator was built for)."""
        self.session = session
        self.cfg = cfg = session.cfg
        self.rundir: RunDir = session.rundir
        self.accelerator = accelerator = session.accelerator
        # A training process started by the launcher gets its stop requests from it (worker.py).
        self.watcher = watcher or PreemptionWatcher()
        self.after_training = after_training
        self.deadline = attempt_deadline()  # the attempt's "checkpoint and stop by" time (NOESIS_DEADLINE)
        self.progress = Progress()
        self.step_losses: list[float] = []
        self.strategy = strategy
        from accelerate.utils import set_seed

        set_seed(cfg.train.seed)
        on_cuda = accelerator.device.type == "cuda"

        with accelerator.main_process_first():  # the main process fills the caches, the others read them
            self.tokenizer = modeling.load_tokenizer(cfg.model)
            self.data = data_mod.prepare(cfg.data, self.tokenizer, cfg.train.seed)
            model = modeling.build_model(cfg.model, cfg.peft, len(self.tokenizer), on_cuda)
        self.accumulation = accelerator.gradient_accumulation_steps
        self.loss_scale = self.accumulation * accelerator.num_processes
        self.label_counts = torch.as_tensor(self.data.train["label_count"], dtype=torch.long)
        self.sampler = LengthBucketBatchSampler(
            self.data.train["length"],
            micro_batch_size=cfg.train.micro_batch_size,
            accumulation=self.accumulation,
            world_size=accelerator.num_processes,
            rank=accelerator.process_index,
            seed=cfg.train.seed,
            mega_batch_factor=cfg.data.mega_batch_factor,
            max_tokens_per_batch=cfg.data.max_tokens_per_batch,
        )
        self.total_steps = self._total_steps()
        self.collate = packing.build_collator(cfg.data, self.tokenizer.pad_token_id)

        self.model, self.optimizer, self.scheduler = self.strategy.prepare(
            accelerator,
            model,
            lambda prepared: optim.build_optimizer(prepared, cfg.optim, on_cuda),
            lambda optimizer: optim.build_scheduler(optimizer, cfg.optim, self.total_steps),
        )
        self.trainable_params = [p for p in self.model.parameters() if p.requires_grad]
        self.gradient_probe = probes.install_gradient_probe(accelerator, self.model, self.strategy)
        accelerator.register_for_checkpointing(self.progress)
        accelerator.register_for_checkpointing(self.sampler)
        self.checkpoints = CheckpointManager(
            accelerator,
            self.rundir,
            cfg.ckpt,
            self.total_steps,
            fingerprint(asdict(cfg)),
            session.committer,
            self.strategy,
            losses.LOSS_NORMALIZATION,
            num_machines=cfg.distributed.num_machines,
        )
        self.eval_interval = interval_steps(cfg.train.eval_every, self.total_steps)
        self.resumed_from = self._resume()
        self.metrics = MetricsLogger(
            accelerator,
            self.rundir,
            self.total_steps,
            self.progress.step,
            cfg.train.progress_bar,
            cfg.train.print_every,
            tracker_run=session.tracker_run,
        )
        self.plan = self._write_plan()
        self.spend = self._spend()
        self._step_seconds: deque[float] = deque(maxlen=10)  # the newest optimizer steps' wall times
        self._last_step_end = time.monotonic()
        # Read once here, not at every step: before this attempt measures its own, the step time the
        # previous attempt recorded (else the plan's), and the newest save's time (at least the plan's).
        main = accelerator.is_main_process  # the one that judges the budget
        recorded = (self.rundir.status() or {}).get("seconds_per_step") if main else None
        self._earlier_step_seconds = float(recorded) if recorded else self._planned("seconds_per_step")
        events = self.rundir.events() if main else []
        saves = [e["seconds"] for e in events if e.get("event") == "checkpoint" and e.get("seconds")]
        self._planned_save_seconds = self._planned("checkpoint_seconds") or 0.0
        self._save_seconds = max(saves[-1] if saves else 0.0, self._planned_save_seconds, 1.0)
        self.attempt_start_step = self.progress.step
        self._announce(model)
        self._refuse_start_over_budget()

    @classmethod
    def run_config(
        cls,
        cfg: Config,
        committer: Committer | None = None,
        watcher: PreemptionWatcher | None = None,
        after_training: AfterTraining | None = None,
    ) -> RunResult:
        """One start of `cfg`'s run: open the session, build the trainer, train, finish, recording in
        status.json how and why it ended. Bad flag combinations are rejected before any loading.

        `cfg` is typed already (`validate` returned it); checked again here for a caller that built it."""
        check_config(cfg)
        require_installed(cfg)  # Accelerate would drop a missing tracker without a word
        rundir = RunDir.of(cfg.run)
        tracker_logs = tracker_logs_dir(cfg, rundir)
        mirrored = mirroring_committer(committer, tracker_logs, rundir)
        watcher = watcher or PreemptionWatcher()
        session: RunSession | None = None
        trainer: Trainer | None = None

        def on_forced_exit(signum: int) -> None:  # a start refused before it owned the run dir records nothing
            if session is not None:
                session.record_forced_exit(signum, trainer.progress.step if trainer is not None else None)

        watcher.on_forced_exit = on_forced_exit
        # Installed first: a preemption while the model loads is honoured as soon as it is safe.
        watcher.install()
        try:
            strategy = build_strategy(cfg)
            accelerator = _build_accelerator(cfg, tracker_logs, strategy)
            status = already_completed(cfg, accelerator, rundir)
            if status is not None:
                return RunResult(
                    rundir.path,
                    RunState.ALREADY_COMPLETED,
                    int(status.get("step", 0)),
                    int(status.get("total_steps", 0)),
                )
            session = RunSession.open(cfg, accelerator, mirrored, tracker_logs)
            try:
                trainer = cls(session, strategy, watcher, after_training)
                if watcher.requested:  # while it loaded: nothing new to save, the resume point stands
                    raise InterruptedBySignal(watcher.received or signal.SIGTERM, trainer.resumed_from is not None)
                return trainer.run()
            except BudgetReached as stop:  # at the start: the resume point stands, the stop is recorded
                return RunResult(rundir.path, RunState.BUDGET, stop.step, stop.total_steps)
            except BaseException as err:
                session.record_exit(err, trainer.progress.step if trainer is not None else None)
                raise
        finally:
            if session is not None:
                session.close()  # the tracker's files before the caller's final commit, which then carries them
            # Also after a stop or a failure: the next run in this process (a sweep job, a test)
            # must not have its signals routed to this finished trainer.
            watcher.uninstall()
            _reset_accelerate_state()

    @classmethod
    def for_config(cls, cfg: Config, committer: Committer | None = None) -> Trainer:
        """A complete trainer on `cfg`'s run dir for a caller that drives `train()` itself (the benches):
        no signal handling and no exit accounting; a run that already completed is refused."""
        check_config(cfg)
        require_installed(cfg)
        rundir = RunDir.of(cfg.run)
        tracker_logs = tracker_logs_dir(cfg, rundir)
        strategy = build_strategy(cfg)
        accelerator = _build_accelerator(cfg, tracker_logs, strategy)
        if already_completed(cfg, accelerator, rundir) is not None:
            raise ResumeError(f"{rundir.path} already completed; choose a new run.name to train again")
        session = RunSession.open(cfg, accelerator, mirroring_committer(committer, tracker_logs, rundir), tracker_logs)
        try:
            return cls(session, strategy)
        except BaseException:
            session.close()
            raise

    def _total_steps(self) -> int:
        total = planned_steps(self.sampler, self.cfg.train.max_steps, self.cfg.train.epochs)
        if total == 0:
            raise DataError(
                f"data.path: {self.data.stats.train_records} training records cannot fill one global batch of "
                f"{self.cfg.train.global_batch_size}; lower train.global_batch_size or add data"
            )
        return total

    def _resume(self) -> Checkpoint | None:
        """Load the checkpoint `ckpt.resume` chooses (rank 0 chooses), and record where training starts."""
        self.checkpoints.remove_stale_partials()
        self.accelerator.wait_for_everyone()
        checkpoint = main_decides(self.accelerator, lambda: self.checkpoints.select_for_resume(self.cfg.ckpt.resume))
        optimizer_reset = False
        if checkpoint is not None:
            optimizer_reset = self.checkpoints.load(checkpoint)
            # Every rank lets go of the checkpoint's files before rank 0 commits below: a Volume's
            # reload (part of every commit) fails while any process of the container holds one open.
            self.accelerator.wait_for_everyone()
        world = self.accelerator.num_processes
        saved_world = int(checkpoint.manifest.get("world_size", 1)) if checkpoint is not None else world
        other_count = saved_world if saved_world != world else None  # the count that wrote it, when not ours
        if self.accelerator.is_main_process:
            self.session.record_start(checkpoint, self.progress.step, other_count, optimizer_reset)
            if checkpoint is not None:  # a curve the Volume cut short comes back from the checkpoint's copy
                restore_cut_metrics(self.rundir, checkpoint.path)
            # Steps logged after the resume point (or every step, if nothing was saved) are re-done.
            truncate_metrics_after(self.rundir, self.progress.step)
            self.session.commit_progress()
            if checkpoint is not None:
                print(f"resumed from {checkpoint.path} at step {self.progress.step}/{self.total_steps}", flush=True)
                if other_count is not None:
                    carried = "optimizer moments started afresh" if optimizer_reset else "optimizer state carried"
                    print(
                        f"resumed on {world} process(es) a checkpoint written by "
                        f"{other_count} ({carried}; the global batch and data order continue)",
                        flush=True,
                    )
        return checkpoint

    def _announce(self, model: torch.nn.Module) -> None:
        trainable, total = modeling.count_parameters(model)
        stats = self.data.stats
        self.metrics.write(
            f"run {self.rundir.path}: {self.accelerator.num_processes} process(es) on {self.accelerator.device.type}, "
            f"{self.accelerator.distributed_type}, distributed={self.strategy.name}; "
            f"{trainable:,} of {total:,} parameters train; "
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
        for note in data_mod.template_notes(self.tokenizer, self.cfg.data, stats):
            self.metrics.write(note)
        self.session.record_running(
            self.progress.step, self.total_steps, self.resumed_from.path if self.resumed_from else None
        )

    # ================================================================ train

    def train(self) -> None:
        """The loop: batch -> forward -> backward -> step -> checkpoint hook -> log, until total steps."""
        progress = self.progress
        if progress.step == 0 and progress.initial_eval_loss is None and len(self.data.eval):
            progress.initial_eval_loss = self.evaluate()
            if progress.initial_eval_loss is None:  # stopped before the first step: nothing to save or lose
                self._stop_before_the_first_step()
            self.metrics.write(f"held-out loss before training: {progress.initial_eval_loss:.4f}")
        self.model.train()
        while progress.step < self.total_steps:
            finished_epoch = self._train_epoch()
            if finished_epoch:
                self.sampler.set_epoch(self.sampler.epoch + 1, 0)

    def _stop_before_the_first_step(self) -> NoReturn:
        if self.watcher.requested:
            raise InterruptedBySignal(self.watcher.received or signal.SIGTERM, self.resumed_from is not None)
        raise StoppedAtDeadline()

    def _train_epoch(self) -> bool:
        """Train from the sampler's position; True if the epoch's batches ran out."""
        loader = torch.utils.data.DataLoader(
            self.data.train,
            batch_sampler=list(self.sampler),
            collate_fn=self.collate,
            num_workers=self.cfg.data.num_workers,
            pin_memory=self.accelerator.device.type == "cuda",
            # A private generator: creating the loader must not draw from the global RNG that dropout
            # uses, or a resumed run (one extra loader) would diverge from an uninterrupted one.
            generator=torch.Generator().manual_seed(self.cfg.train.seed),
        )
        step_loss, step_samples, step_tokens = None, 0, 0
        for batch in loader:
            if step_loss is None:  # the first micro-batch of an optimizer step
                label_tokens = self._global_batch_label_tokens()
            # Counted on the host before the copy, so the loop never waits for the GPU to report them.
            samples, tokens = packing.records_and_tokens(batch)
            batch = {k: v.to(self.accelerator.device, non_blocking=True) for k, v in batch.items()}
            try:
                loss, grad_norm = self._micro_step(batch, label_tokens)
            except torch.OutOfMemoryError:
                raise self._out_of_memory(batch) from None
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
        faults.maybe_inject("oom", self.progress.step + 1)
        with self.strategy.accumulate(accelerator, self.model):
            loss = losses.micro_batch_loss(self.model, batch, label_tokens)
            # Accelerate (or the ZeRO engine) divides by the accumulation steps and every strategy averages
            # over the processes; scaling by both first leaves exactly the sum over the global batch / its tokens.
            accelerator.backward(loss * self.loss_scale)
            if accelerator.sync_gradients:
                if self.gradient_probe is not None:
                    self.gradient_probe(self.progress.step + 1)
                if self.cfg.optim.max_grad_norm > 0:
                    grad_norm = self.strategy.clip_grad_norm(
                        accelerator, self.trainable_params, self.cfg.optim.max_grad_norm
                    )
                # Stepped at a step's last micro-batch only: an optimizer Accelerate did not wrap (FSDP2's)
                # would otherwise step at every one. The ZeRO engine steps inside backward; this is a no-op there.
                self.optimizer.step()
                self.scheduler.step()  # once per optimizer step
                self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), grad_norm

    def _after_optimizer_step(self, loss: float, grad_norm: float | None, samples: int, tokens: int) -> None:
        progress, cfg = self.progress, self.cfg
        progress.step += 1
        self.sampler.advance()
        now = time.monotonic()
        self._step_seconds.append(now - self._last_step_end)
        self._last_step_end = now
        if progress.step == self.attempt_start_step + 1:
            self._record_first_step_memory()
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
        if progress.step % cfg.train.log_every == 0 or progress.step == self.total_steps:
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
            self.metrics.progress(progress.step, loss, lr, tokens_per_s, self._money_words())
        if (
            self.eval_interval
            and len(self.data.eval)
            and progress.step % self.eval_interval == 0
            and progress.step < self.total_steps
        ):  # no held-out set, no held-out loss (not a NaN)
            eval_loss = self.evaluate()
            if eval_loss is not None:
                self.metrics.log(progress.step, {"eval_loss": eval_loss})
                self.metrics.write(f"step {progress.step}: held-out loss {eval_loss:.4f}")
            else:
                self.metrics.write(f"step {progress.step}: held-out pass given up for the stop request's checkpoint")
            self.model.train()
        self._checkpoint_hook()
        self.session.progress_commit_hook(self.progress.step, **self._money_status())

    def _checkpoint_hook(self) -> None:
        """Save when due (interval, minutes, signal, deadline, final); after a stop request, stop once saved."""
        faults.maybe_inject("step", self.progress.step)
        faults.maybe_inject("term", self.progress.step)
        faults.maybe_inject("usr1", self.progress.step)
        self.session.check_lease()
        signal_received, minutes_due, deadline_due, budget_due = self._agreed_flags()
        reason = self.checkpoints.due(self.progress.step, signal_received, minutes_due, deadline_due)
        if budget_due and reason in (None, "interval") and self.progress.step < self.total_steps:
            reason = "budget"
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
        seconds = time.monotonic() - started
        self._save_seconds = max(seconds, self._save_seconds, self._planned_save_seconds, 1.0)  # the slowest
        self.session.record_checkpoint(self.progress.step, reason, path, seconds)
        if self.accelerator.is_main_process:
            self.metrics.write(f"step {self.progress.step}: checkpoint {path.name} ({reason})")
        if reason == "signal":
            raise InterruptedBySignal(self.watcher.received or 15)
        if reason == "deadline":
            raise StoppedAtDeadline()
        if reason == "budget":
            raise self._budget_reached()

    def _agreed_flags(self) -> tuple[bool, bool, bool, bool]:
        """Signal, wall-clock, deadline and budget triggers, agreed across ranks so every rank saves at the
        same step (the budget is the main process's judgement: it reads the run's history)."""
        flags = [
            float(self.watcher.requested),
            float(self.checkpoints.minutes_elapsed_due()),
            float(deadline_reached(self.deadline)),
            float(self.accelerator.is_main_process and self._over_budget()),
        ]
        if self.accelerator.num_processes > 1:
            tensor = torch.tensor(flags, device=self.accelerator.device)
            flags = self.accelerator.reduce(tensor, reduction="sum").tolist()
        return flags[0] > 0, flags[1] > 0, flags[2] > 0, flags[3] > 0

    def evaluate(self) -> float | None:
        """Held-out loss (token-weighted, the quantity the training loss logs), sharded across ranks; None
        when a stop request (a signal, the deadline) came during the pass: its checkpoint comes first."""
        accelerator = self.accelerator
        reduce_sum = (lambda t: accelerator.reduce(t, reduction="sum")) if accelerator.num_processes > 1 else None
        faults.maybe_inject("eval", self.progress.step)
        # The unwrapped model: no gradient hooks. Its forward is still a collective where the weights are
        # sharded: then every rank runs the same number of batches and they agree on a stop at each one.
        return losses.heldout_loss_unless_stopped(
            self.strategy.unwrap(accelerator, self.model),
            self.data.eval,
            self.collate,
            self.cfg.train.micro_batch_size,
            accelerator.device,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            autocast=accelerator.autocast,
            reduce_sum=reduce_sum,
            stop=lambda: self.watcher.requested or deadline_reached(self.deadline),
            lockstep=self.strategy.forward_is_collective,
        )

    # ================================================================ finish

    def finish(self) -> RunResult:
        """Held-out loss after training, the final adapter and tokenizer, status `completed`."""
        accelerator, strategy, main = self.accelerator, self.strategy, self.accelerator.is_main_process
        eval_after = self.evaluate() if len(self.data.eval) else None
        accelerator.wait_for_everyone()
        target = self.rundir.final_weights_dir(self.cfg.peft.enabled)
        strategy.save_final(accelerator, self.model, target)  # gathered first where the weights are sharded
        answer = self._sample_answer()
        if main:
            self.tokenizer.save_pretrained(str(target))
            before = self.progress.initial_eval_loss
            if eval_after is not None:
                self.metrics.log(self.progress.step, {"eval_loss": eval_after})
                before_text = f"{before:.4f}" if before is not None else "n/a"
                self.metrics.write(f"held-out loss: before {before_text} -> after {eval_after:.4f}")
            self.metrics.write(f"saved {target}")
            if answer is not None:
                self.metrics.write(f"sample: {self.cfg.train.sample_prompt!r} -> {answer!r}")
            self.session.record_completed(self.progress.step, before, eval_after)
        self.metrics.close()
        # The work after training runs on the main process alone, on a whole model: where the weights are
        # sharded, every rank helps gather them first (the same decision on every rank).
        after_model = (
            strategy.main_process_model(accelerator, self.model, self._rebuild_model)
            if self.after_training is not None
            else None
        )
        after_training = self.after_training if main else None
        accelerator.wait_for_everyone()
        self.session.close_tracker()
        accelerator.end_training()  # also tears down the process group: nothing collective after it
        if after_training is not None:  # after end_training, so the other processes are not held at a barrier
            after_training(self.cfg, after_model, self.tokenizer, self.data.eval)
        return RunResult(
            self.rundir.path,
            RunState.COMPLETED,
            self.progress.step,
            self.total_steps,
            self.progress.initial_eval_loss,
            eval_after,
            list(self.step_losses),
        )

    def _sample_answer(self) -> str | None:
        """The greedy answer to `train.sample_prompt` (main process; every rank takes part where the
        forward is a collective)."""
        prompt = self.cfg.train.sample_prompt
        collective = self.strategy.forward_is_collective
        if not prompt or not (collective or self.accelerator.is_main_process):
            return None
        from noesis_accel.training.generate import reply

        return reply(self.strategy.unwrap(self.accelerator, self.model), self.tokenizer, prompt, synced=collective)

    def _rebuild_model(self) -> torch.nn.Module:
        """The run's model built afresh on the CPU (the base from its source, LoRA initialised). A base drawn
        from `model.architecture` is drawn after the same seed as at the start, so it is the same base;
        torch's RNG stream is left as it was (nothing draws from the others after training)."""
        from accelerate.utils import set_seed

        with torch.random.fork_rng(devices=[]):
            set_seed(self.cfg.train.seed)
            return modeling.build_model(self.cfg.model, self.cfg.peft, len(self.tokenizer), False)

    # ================================================================ lifecycle

    def run(self) -> RunResult:
        """train -> finish (the caller records how the run ended: see `run_config`); a run stopped by
        its budget ends here too, after its checkpoint, with state `budget`."""
        try:
            self.train()
        except BudgetReached as stop:
            return self._stop_for_budget(stop)
        return self.finish()

    # ================================================================ money and memory

    def _write_plan(self) -> dict[str, Any] | None:
        """This run's plan (plan.json) from the data and model just loaded, for status and the report.

        An estimate only: a plan that cannot be made is a warning, never the end of a run.
        """
        if not self.accelerator.is_main_process:
            return None
        try:
            plan = make_plan(self.cfg, prepared=self.data, vocab_size=len(self.tokenizer))
        except Exception as err:  # any library's failure on the meta device
            log.warning("no plan.json for this run (%s: %s)", err.__class__.__name__, err)
            return None
        write_plan(self.rundir.path, plan)
        return plan.to_json()

    def _spend(self) -> Spend:
        main = self.accelerator.is_main_process
        return Spend.for_attempt(
            self.cfg,
            history(self.rundir) if main else [],
            self.accelerator.num_processes,
            self.accelerator.device.type,
            device_name(self.accelerator),
            failed_starts(self.rundir) if main else [],
        )

    def _planned(self, key: str) -> float | None:
        """A figure of this run's plan for the device it trains on (the first entry)."""
        if not self.plan or not self.plan.get("gpus"):
            return None
        value = self.plan["gpus"][0].get(key) if key != "checkpoint_seconds" else self.plan.get(key)
        return None if value is None else float(value)

    def _seconds_per_step(self) -> float | None:
        """The newest steps' slowest wall time (a slow step is the one that could pass the cap); before
        any step of this attempt, the previous attempt's measure, then the plan's."""
        return max(self._step_seconds) if self._step_seconds else self._earlier_step_seconds

    def _over_budget(self) -> bool:
        """Whether one more step and a checkpoint would pass `budget.usd` (main process; False with no cap).

        Both at twice their slowest recent time: on a busy machine a step and the save after it were seen
        to take twice as long as the ones before, and the cap is a promise, while stopping a step early
        costs one step of a restart.
        """
        if self.spend.cap_usd is None:
            return False
        ahead = (self._seconds_per_step() or 0.0) + self._save_seconds
        return self.spend.would_pass_cap(BUDGET_MARGIN * ahead)

    def _budget_reached(self) -> BudgetReached:
        return BudgetReached(self.progress.step, self.total_steps, self.spend.spent(), float(self.spend.cap_usd or 0.0))

    def _record_budget_stop(self, stop: BudgetReached) -> None:
        if self.accelerator.is_main_process:
            self.session.record_stop(RunState.BUDGET, str(stop), self.progress.step, **self._money_status())
            self.metrics.write(f"budget: {stop}")

    def _refuse_start_over_budget(self) -> None:
        """At the start of an attempt: a budget already spent (or that one step would pass) stops it here,
        on every rank (the main process decides)."""
        if main_decides(self.accelerator, self._over_budget):
            stop = self._budget_reached()
            self._record_budget_stop(stop)
            raise stop

    def _stop_for_budget(self, stop: BudgetReached) -> RunResult:
        accelerator = self.accelerator
        self._record_budget_stop(stop)
        self.metrics.close()
        accelerator.wait_for_everyone()
        self.session.close_tracker()
        accelerator.end_training()
        return RunResult(
            self.rundir.path,
            RunState.BUDGET,
            self.progress.step,
            self.total_steps,
            self.progress.initial_eval_loss,
            None,
            list(self.step_losses),
        )

    def _money_status(self) -> dict[str, Any]:
        """Spent so far, the projected total and the ETA, from the measured step time (status.json)."""
        per_step = self._seconds_per_step()
        left = (self.total_steps - self.progress.step) * per_step if per_step else None
        status: dict[str, Any] = {"seconds_per_step": round(per_step, 4) if per_step else None}
        status["eta_s"] = round(left) if left is not None else None
        if self.spend.price is not None:
            status["spent_usd"] = round(self.spend.spent(), 4)
            status["projected_usd"] = round(self.spend.projected(left), 4) if left is not None else None
        status["budget_usd"] = self.spend.cap_usd
        return status

    def _money_words(self) -> str:
        """', $1.23 spent, ~$4.56 in all (cap $10.00)' for a progress line; '' with no price."""
        if self.spend.price is None:
            return ""
        money = self._money_status()
        projected = money.get("projected_usd")
        cap = f" (cap {format_usd(self.spend.cap_usd)})" if self.spend.cap_usd is not None else ""
        total = f", ~{format_usd(projected)} in all" if projected is not None else ""
        return f", {format_usd(money['spent_usd'])} spent{total}{cap}"

    def _record_first_step_memory(self) -> None:
        """The first step's measured peak beside the plan's estimate (metrics.jsonl and status.json)."""
        if self.accelerator.device.type == "cuda":
            measured = torch.cuda.max_memory_allocated(self.accelerator.device)
            how = "torch.cuda.max_memory_allocated"
        else:  # the process's peak resident memory: Linux reports kilobytes
            measured = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            how = "process peak RSS (getrusage)"
        planned = self._planned("total_bytes")
        record = {
            "first_step_peak_memory_gib": round(measured / 2**30, 3),
            "first_step_peak_memory_measure": how,
            "planned_memory_gib": round(planned / 2**30, 3) if planned else None,
        }
        self.metrics.log(self.progress.step, record)
        if self.accelerator.is_main_process:
            self.session.record_first_step(record)

    def _out_of_memory(self, batch: dict[str, torch.Tensor]) -> Exception:
        """The out-of-memory error as a user error (batch shape) or a crash to retry (see oom.py)."""
        previous = out_of_memory_stops(self.rundir.events())
        return out_of_memory(self.progress.step, batch, self.accelerator.device, previous, self.cfg.ckpt.oom_retries)


def _build_accelerator(cfg: Config, tracker_logs: Path, strategy: Strategy) -> Any:
    env.quiet_libraries()
    env.apply_alloc_conf(cfg.env.alloc_conf)
    return build_accelerator(cfg, tracker_logs, strategy)


def _reset_accelerate_state() -> None:
    """Accelerate keeps its state in process-wide singletons; the next run in this process (a sweep
    job, a test) may want another precision or device, so each run leaves them clean."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
