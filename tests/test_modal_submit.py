"""Starting work on Modal, offline: a run is spawned (Modal's server drives its retries), a sweep is one
coordinator call that runs every job inside Modal and reports each one's outcome, and bad data is
refused before any GPU starts. The app is loaded as `modal run` declares it; function bodies run in-process."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from types import ModuleType

import pytest
from conftest import SAMPLE, chat_records, write_jsonl
from helpers import wait_until
from hydra.core.utils import JobReturn, JobStatus
from modal_fakes import FakeCall, RecordingFunction, completed_run
from test_modal_entry import load_app

from noesis_accel.config import sweeps
from noesis_accel.config.sweeps import CallBook, JobRequest, run_all, sweep_jobs

# In-process bodies of functions that mount a Volume: Modal warns that a local run has none.
pytestmark = pytest.mark.filterwarnings("ignore:The .* function is executing locally")

TINY = ["+experiment=tiny", "train.max_steps=2", "modal.secret=null"]


def _functions(
    app: ModuleType,
    train: RecordingFunction | None = None,
    sweep: RecordingFunction | None = None,
    check: RecordingFunction | None = None,
    *,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, RecordingFunction]:
    """The entry's functions replaced by recorders (what `main` hands to `submit`)."""
    fakes = {
        "train": train or RecordingFunction("train", completed_run),
        "sweep": sweep or RecordingFunction("sweep", lambda args: {"jobs": [], "exit_code": 0}),
        "check_data": check or RecordingFunction("check", lambda overrides: {"error": None}),
    }
    monkeypatch.setattr(app, "training_function", lambda: fakes["train"])
    monkeypatch.setattr(app, "sweep", fakes["sweep"])
    monkeypatch.setattr(app, "check_data", fakes["check_data"])
    return fakes


# ---------------------------------------------------------------- one run


def test_a_run_is_spawned_and_says_how_to_follow_and_stop_it(monkeypatch, capsys) -> None:
    app = load_app(TINY, monkeypatch)
    fakes = _functions(app, monkeypatch=monkeypatch)
    app.main.info.raw_f(*TINY)
    train = fakes["train"]
    assert train.spawned == [TINY] and not train.remote_calls and train.calls[0].gets == 1
    out = capsys.readouterr().out
    assert "modal: started call fc-train-1" in out
    assert "modal app logs noesis-accel --function-call fc-train-1 --follow" in out
    assert "modal app stop noesis-accel" in out and "modal.FunctionCall.from_id('fc-train-1').cancel()" in out
    assert "modal: completed at step 2/2 in /vol/runs/tiny" in out
    assert not fakes["check_data"].remote_calls  # the sample data is in the image: checked here


def test_a_call_that_fails_after_its_retries_is_one_line_and_its_exit_code(monkeypatch, capsys) -> None:
    class Crashed(RuntimeError):
        exit_code = 1

    def crash(args):
        raise Crashed("training process exited with code -9\nmore detail")

    app = load_app(TINY, monkeypatch)
    _functions(app, train=RecordingFunction("train", crash), monkeypatch=monkeypatch)
    with pytest.raises(SystemExit) as stopped:
        app.main.info.raw_f(*TINY)
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert "error: call fc-train-1 failed after its retries: Crashed: training process exited with code -9" in err
    assert "Traceback" not in err and "more detail" not in err


def test_a_lost_connection_says_the_detached_app_keeps_running_and_is_left_to_modals_runner(
    monkeypatch, capsys
) -> None:
    """Not "failed after its retries": the call goes on. Modal's runner (`_run_app` in modal/runner.py) catches
    the ConnectionError of a detached app and prints how to follow it, so it must reach the runner as it is."""
    from modal.exception import ConnectionError as ModalConnectionError

    def lost(args):
        raise ModalConnectionError("Deadline exceeded")

    app = load_app(TINY, monkeypatch)
    _functions(app, train=RecordingFunction("train", lost), monkeypatch=monkeypatch)
    with pytest.raises(ModalConnectionError):
        app.main.info.raw_f(*TINY)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("modal:") or line.startswith("error:")]
    assert len(lines) == 1 and "the detached app keeps running" in lines[0] and "failed after" not in err
    assert "modal app logs noesis-accel --function-call fc-train-1 --follow" in lines[0]


def test_a_user_error_from_the_container_keeps_its_exit_code(monkeypatch) -> None:
    app = load_app(TINY, monkeypatch)
    failed = RecordingFunction("train", lambda args: {"state": "failed", "error": "x", "exit_code": 2})
    _functions(app, train=failed, monkeypatch=monkeypatch)
    with pytest.raises(SystemExit) as stopped:
        app.main.info.raw_f(*TINY)
    assert stopped.value.code == 2


# ---------------------------------------------------------------- the data, before any GPU


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "data.min_examples=100000",
            f"data.path: only 162 training records (180 read from {SAMPLE}, 18 held out); data.min_examples is 100000",
        ),
        (f"data.path={SAMPLE.parent / 'missing.jsonl'}", "missing.jsonl does not exist"),
    ],
)
def test_bad_data_in_the_image_fails_here_before_any_call(override: str, message: str, monkeypatch, capsys) -> None:
    app = load_app(TINY, monkeypatch)
    fakes = _functions(app, monkeypatch=monkeypatch)
    with pytest.raises(SystemExit) as stopped:
        app.main.info.raw_f(*TINY, override)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") <= 2 and "Traceback" not in err
    assert not fakes["train"].spawned and not fakes["check_data"].remote_calls


def test_a_file_only_on_this_machine_is_refused_with_the_upload_command(tmp_path, monkeypatch, capsys) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", chat_records(120))
    app = load_app(TINY, monkeypatch)
    fakes = _functions(app, monkeypatch=monkeypatch)
    with pytest.raises(SystemExit) as stopped:
        app.main.info.raw_f(*TINY, f"data.path={data}")
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert f"data.path: {data} is on this machine only" in err
    assert f"modal volume put noesis-training-data {data} /data/train.jsonl" in err
    assert "data.path=/vol/data/train.jsonl" in err and not fakes["train"].spawned


def test_data_on_the_volume_is_checked_by_the_cpu_function_first(tmp_path, monkeypatch, capsys) -> None:
    """The CPU function's real body (`.local()`) reads the Volume; a bad line stops the run before its GPUs."""
    mount = tmp_path / "vol"
    (mount / "data").mkdir(parents=True)
    good = write_jsonl(mount / "data" / "good.jsonl", chat_records(80))
    bad = write_jsonl(mount / "data" / "bad.jsonl", [*chat_records(80)[:7], "{not json", *chat_records(10)])
    args = [*TINY, f"modal.mount={mount}"]
    app = load_app(args, monkeypatch)
    real_check = app.check_data  # its body runs in-process (`.local()`); `main` sees the recorder around it
    check = RecordingFunction("check", lambda overrides: real_check.local(overrides))
    fakes = _functions(app, check=check, monkeypatch=monkeypatch)

    app.main.info.raw_f(*args, f"data.path={good}")
    assert check.remote_calls == [[*args, f"data.path={good}"]] and len(fakes["train"].spawned) == 1

    with pytest.raises(SystemExit) as stopped:
        app.main.info.raw_f(*args, f"data.path={bad}")
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert f"{bad}:8: invalid JSON" in err and "Traceback" not in err
    assert len(fakes["train"].spawned) == 1  # no second training call


def test_a_hub_dataset_is_left_to_training(monkeypatch, capsys) -> None:
    app = load_app(TINY, monkeypatch)
    fakes = _functions(app, monkeypatch=monkeypatch)
    app.main.info.raw_f(*TINY, "data.path=someone/some-dataset")
    assert len(fakes["train"].spawned) == 1 and not fakes["check_data"].remote_calls
    assert "no plan for tiny before its GPUs start" in capsys.readouterr().out  # and says how to have one


# ---------------------------------------------------------------- the plan, before any GPU


def _volume_data(tmp_path, records: int) -> tuple[list[str], str]:
    mount = tmp_path / "vol"
    (mount / "data").mkdir(parents=True)
    data = write_jsonl(mount / "data" / "train.jsonl", chat_records(records))
    return [*TINY, f"modal.mount={mount}", f"data.path={data}"], str(data)


def _with_real_check(app: ModuleType, monkeypatch: pytest.MonkeyPatch) -> dict[str, RecordingFunction]:
    real_check = app.check_data  # the CPU function's body, in-process: it counts the records on the Volume
    return _functions(
        app, check=RecordingFunction("check", lambda overrides: real_check.local(overrides)), monkeypatch=monkeypatch
    )


# Each row of the largest micro-batch holds data.max_length tokens (the Volume's data is not tokenised
# here): 16 x 2048 tokens of tiny's 49,152-word logits are ~18 GiB, past a T4's 15 GiB.
UNFIT = ["modal.gpu=T4", "data.max_length=2048", "train.micro_batch_size=16", "train.global_batch_size=16"]


def test_a_run_that_does_not_fit_its_gpu_is_refused_before_any_call(tmp_path, monkeypatch, capsys) -> None:
    args, _ = _volume_data(tmp_path, 200)
    app = load_app(args, monkeypatch)
    fakes = _with_real_check(app, monkeypatch)
    with pytest.raises(SystemExit) as stopped:
        app.main.info.raw_f(*args, *UNFIT)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "error: plan: T4 does not fit" in err and "the largest term is logits" in err and "Traceback" not in err
    assert "would fit: train.micro_batch_size=8, data.max_length=1024, modal.gpu=L40S:1" in err
    assert not fakes["train"].spawned and len(fakes["check_data"].remote_calls) == 1


def test_a_run_over_its_budget_is_refused_unless_the_preflight_only_warns(tmp_path, monkeypatch, capsys) -> None:
    """The Volume's record count sizes the plan; 1,000 epochs of 180 records of 2,048 tokens on an H100."""
    args, _ = _volume_data(tmp_path, 200)
    costly = [*args, "modal.gpu=H100", "data.max_length=2048", "train.max_steps=null", "train.epochs=1000"]
    app = load_app(costly, monkeypatch)
    fakes = _with_real_check(app, monkeypatch)
    with pytest.raises(SystemExit) as stopped:
        app.main.info.raw_f(*costly, "budget.usd=0.01")
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "budget.usd: the plan for H100 is $" in err and "over the budget of $0.01" in err
    assert "budget.preflight=warn" in err and not fakes["train"].spawned

    app.main.info.raw_f(*costly, "budget.usd=0.01", "budget.preflight=warn")
    out = capsys.readouterr().out
    assert "modal: tiny: plan: H100" in out and "(data assumed: plan.records)" in out and "budget $0.01" in out
    assert "modal: warning: budget.usd: the plan for H100" in out and len(fakes["train"].spawned) == 1


def test_a_sweep_with_one_unfit_job_starts_nothing(tmp_path, monkeypatch, capsys) -> None:
    args, _ = _volume_data(tmp_path, 200)
    app = load_app(args, monkeypatch)
    fakes = _with_real_check(app, monkeypatch)
    with pytest.raises(SystemExit) as stopped:
        app.main.info.raw_f("-m", *args, *UNFIT[:3], "train.global_batch_size=16", "train.micro_batch_size=1,16")
    assert stopped.value.code == 2
    assert "plan: T4 does not fit" in capsys.readouterr().err
    assert not fakes["sweep"].spawned and not fakes["train"].spawned
    assert len(fakes["check_data"].remote_calls) == 1  # one data config: read once for both jobs


# ---------------------------------------------------------------- a sweep


SWEEP = ["-m", *TINY, "optim.lr=1e-3,2e-3,3e-3"]


def _outcome(job_num: int, lr: str, state: str = "completed", **more) -> dict:
    return {
        "job_num": job_num,
        "overrides": [*TINY, f"optim.lr={lr}"],
        "state": state,
        "value": 0.5,
        "error": None,
        "exit_code": 0,
        **more,
    }


def test_a_sweep_is_one_coordinator_call_and_reports_every_job(monkeypatch, capsys) -> None:
    app = load_app(TINY, monkeypatch)
    result = {
        "jobs": [
            _outcome(0, "0.001"),
            _outcome(1, "0.002", "failed", value=None, exit_code=2, error="error: data.path: bad"),
            _outcome(2, "0.003"),
        ],
        "exit_code": 2,
    }
    fakes = _functions(app, sweep=RecordingFunction("sweep", lambda args: result), monkeypatch=monkeypatch)
    with pytest.raises(SystemExit) as stopped:
        app.main.info.raw_f(*SWEEP)
    assert fakes["sweep"].spawned == [SWEEP] and fakes["sweep"].calls[0].gets == 1
    assert not fakes["train"].spawned  # the jobs are the coordinator's to start, inside Modal
    assert stopped.value.code == 2  # the first failed job's code
    out = capsys.readouterr().out
    assert "a sweep of 3 jobs" in out and "modal: started call fc-sweep-1" in out
    assert (
        "#1 (+experiment=tiny train.max_steps=2 modal.secret=null optim.lr=0.002): failed: error: data.path: bad" in out
    )
    assert "modal: sweep: 3 jobs: 2 completed, 1 failed" in out


def test_the_laptop_splits_a_sweep_into_jobs_as_hydra_does() -> None:
    jobs = sweep_jobs(
        ["-m", "+experiment=tiny", "optim=glob(*)", "optim.lr=1e-3,2e-3", "hydra.sweeper.max_batch_size=2"]
    )
    assert jobs == [
        ["+experiment=tiny", f"optim={name}", f"optim.lr={lr}"]
        for name in ("adamw", "adamw8bit")
        for lr in ("0.001", "0.002")
    ]


def test_a_bad_value_in_one_job_of_a_sweep_fails_before_any_call(monkeypatch, capsys) -> None:
    app = load_app(TINY, monkeypatch)
    fakes = _functions(app, monkeypatch=monkeypatch)
    with pytest.raises(SystemExit) as stopped:
        app.main.info.raw_f("-m", *TINY, "optim.lr=1e-3,-1")
    assert stopped.value.code == 2 and "optim.lr: must be > 0" in capsys.readouterr().err
    assert not fakes["sweep"].spawned


def test_the_coordinator_spawns_one_call_per_job_and_gathers_every_outcome(tmp_path, monkeypatch) -> None:
    """`sweep.local(args)`: Hydra's sweep inside the coordinator; one job's call fails after its
    retries, and the others' outcomes are still all there."""
    args = [*TINY, f"modal.mount={tmp_path}/vol"]
    app = load_app(args, monkeypatch)

    def job(request: dict) -> JobReturn:
        if "optim.lr=0.002" in request["overrides"]:
            raise RuntimeError("the container was lost 11 times")
        return JobReturn(overrides=request["overrides"], status=JobStatus.COMPLETED, _return_value=0.25)

    train = RecordingFunction("train", job)
    monkeypatch.setattr(app, "training_function", lambda: train)
    monkeypatch.setattr(sys, "argv", ["python"])
    result = app.sweep.local(["-m", *args, "optim.lr=1e-3,2e-3,3e-3"])
    assert len(train.spawned) == 3 and all(call.gets == 1 for call in train.calls)
    # spawned from a thread pool, so in whatever order the threads ran
    assert sorted(r["overrides"][-1] for r in train.spawned) == ["optim.lr=0.001", "optim.lr=0.002", "optim.lr=0.003"]
    jobs = {job["job_num"]: job for job in result["jobs"]}
    assert [jobs[n]["state"] for n in (0, 1, 2)] == ["completed", "failed", "completed"]
    assert jobs[1]["error"] == "RuntimeError: the container was lost 11 times" and jobs[0]["value"] == 0.25
    assert result["exit_code"] != 0


class SlowCall:
    """A job's call that runs `seconds`, unless cancelled (then its `.get()` fails, as a cancelled call's does)."""

    def __init__(self, object_id: str, seconds: float) -> None:
        self.object_id, self.seconds = object_id, seconds
        self.cancelled = threading.Event()

    def get(self, timeout: float | None = None) -> JobReturn:
        if self.cancelled.wait(self.seconds):
            raise RuntimeError("the call was cancelled")
        return JobReturn(overrides=[], status=JobStatus.COMPLETED, _return_value=0.25)

    def cancel(self, terminate_containers: bool = False) -> None:
        self.cancelled.set()


class SlowJobs:
    """The app's training function for a sweep of jobs that each take `seconds`."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.calls = seconds, []
        self._lock = threading.Lock()

    def spawn(self, request: dict) -> SlowCall:
        with self._lock:
            call = SlowCall(f"fc-job-{len(self.calls) + 1}", self.seconds)
            self.calls.append(call)
        return call


def test_a_cancelled_coordinator_cancels_every_job_and_ends_within_seconds(tmp_path, monkeypatch) -> None:
    """`modal app stop` (or `.cancel()`) on the sweep: Modal's runtime raises its InputCancellation in the
    coordinator, which must cancel the jobs it started (nothing else stops them) and not wait for them."""
    from modal_sim import describe, run_in_modal_runtime

    args = [*TINY, f"modal.mount={tmp_path}/vol"]
    app = load_app(args, monkeypatch)
    jobs = SlowJobs(seconds=15)
    monkeypatch.setattr(app, "training_function", lambda: jobs)
    monkeypatch.setattr(sys, "argv", ["python"])
    sent: list[float] = []

    def cancel_once_every_job_runs() -> None:
        wait_until(lambda: len(jobs.calls) == 3, 120, "3 jobs started")
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGUSR1)  # what Modal's runtime does to cancel the input

    threading.Thread(target=cancel_once_every_job_runs, daemon=True).start()
    outputs, client = run_in_modal_runtime(app.sweep.local, (["-m", *args, "optim.lr=1e-3,2e-3,3e-3"],))
    ended = time.monotonic()
    assert [o["status"] for o in describe(outputs, client)] == ["TERMINATED"]
    assert sent and ended - sent[0] < 5, f"ended {ended - sent[0]:.1f} s after the cancellation"
    assert len(jobs.calls) == 3 and all(call.cancelled.is_set() for call in jobs.calls)


def test_a_restarted_coordinator_attaches_to_the_calls_it_started(tmp_path) -> None:
    book_file = tmp_path / "sweeps" / "fc-coordinator" / "calls.json"
    requests = [
        JobRequest(task="t:f", config_name="config", job_name="j", job_num=n, overrides=[f"optim.lr={n}"])
        for n in range(2)
    ]
    first = RecordingFunction("train", lambda job: "done")
    attached: list[str] = []
    book = CallBook(book_file, attach=lambda call_id: attached.append(call_id) or FakeCall(call_id, lambda: "done"))
    assert [book.call_for(r, first).object_id for r in requests] == ["fc-train-1", "fc-train-2"]
    again = RecordingFunction("train")
    restarted = CallBook(book_file, attach=book.attach)  # a new container reads the file from the Volume
    assert [restarted.call_for(r, again).get() for r in requests] == ["done", "done"]
    assert attached == ["fc-train-1", "fc-train-2"] and not again.spawned


def test_one_failed_job_never_throws_away_the_others() -> None:
    class Backend:
        def run(self, request: JobRequest) -> JobReturn:
            if request.job_num == 0:
                raise RuntimeError("lost")
            return JobReturn(overrides=request.overrides, status=JobStatus.COMPLETED, _return_value=request.job_num)

    requests = [
        JobRequest(task="t:f", config_name="c", job_name="j", job_num=n, overrides=[f"x={n}"]) for n in range(3)
    ]
    results = run_all(Backend(), requests, max_parallel=3)
    assert [r.status for r in results] == [JobStatus.FAILED, JobStatus.COMPLETED, JobStatus.COMPLETED]
    outcomes = [sweeps.JobOutcome.of(q, r) for q, r in zip(requests, results)]
    assert outcomes[0].line() == "#0 (x=0): failed: RuntimeError: lost"
    assert sweeps.summary(outcomes) == "3 jobs: 2 completed, 1 failed"
    json.dumps([o.__dict__ for o in outcomes])  # travels back from the coordinator as JSON


def test_noesis_train_registers_the_entry_so_modal_imports_its_functions_by_name(monkeypatch) -> None:
    """`hydra/launcher=modal` from noesis-train loads the app itself: registered under the name Modal's CLI
    and the container use, its functions are imported by reference, not cloudpickled."""
    import importlib.util

    from modal._utils.async_utils import synchronizer
    from modal_proto import api_pb2

    from hydra_plugins.noesis_modal_launcher.modal_launcher import PROJECT, load_entry

    monkeypatch.setenv("NOESIS_MODAL_OVERRIDES", json.dumps(TINY))
    monkeypatch.setitem(sys.modules, "modal_entry", None)  # as before the test once it ends
    del sys.modules["modal_entry"]
    entry = load_entry(PROJECT / "launch" / "modal_entry.py")
    assert sys.modules["modal_entry"] is entry and load_entry(PROJECT / "launch" / "modal_entry.py") is entry
    for function in (entry.train, entry.sweep, entry.check_data):
        info = synchronizer._translate_in(function)._source_info
        assert not info.is_serialized()
        assert info.get_definition_type() == api_pb2.Function.DEFINITION_TYPE_FILE and info.module_name == "modal_entry"
    # Loaded as before (exec without registering), the same functions would travel pickled.
    spec = importlib.util.spec_from_file_location("unregistered_entry", PROJECT / "launch" / "modal_entry.py")
    unregistered = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(unregistered)
    assert synchronizer._translate_in(unregistered.train)._source_info.is_serialized()
