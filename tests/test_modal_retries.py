"""What each stop costs in Modal's retries, counted by the client's own retry loop.

Each stop path ends in our function the way `modal_job.end_as_modal_expects` ends it, under Modal's
real container runtime (tests/modal_sim.py `run_in_modal_runtime`, in-process: milliseconds), and
the outputs it sends are read by `modal._functions._Invocation.run_function`, the client's retry
loop, with only its API stub standing in for the server. The one step we cannot run is the
server's: an input whose container ended without an output (Modal's runtime re-raises
KeyboardInterrupt) is reported back as INTERNAL_FAILURE, "lost inputs or worker preemption" in the
client's own comment, which the loop retries without counting.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import pytest
from modal._functions import _Invocation, _RetryContext
from modal.retries import RetryManager
from modal_proto import api_pb2
from modal_sim import run_in_modal_runtime

from noesis_accel.cloud.modal_job import end_as_modal_expects
from noesis_accel.core.signals import FORWARDED_SIGNALS, ForcedStop, InterruptedBySignal, StoppedAtDeadline
from noesis_accel.processes.launcher import TrainingProcessFailed

COMPLETED = {"state": "completed", "step": 12}


def _outputs_of(stop: BaseException | None) -> list[api_pb2.FunctionPutOutputsItem]:
    """What Modal's runtime sends when our function ends with `stop` (None: it completes)."""

    def body(_job: Any) -> Any:
        if stop is None:
            return COMPLETED
        # The handlers the function found on entry: Modal's SIGUSR1 handler, installed by the runtime.
        end_as_modal_expects(stop, {signum: signal.getsignal(signum) for signum in FORWARDED_SIGNALS})

    outputs, _client = run_in_modal_runtime(body, (["+experiment=noesis"],))
    return outputs


def _as_the_server_reports(outputs: list[api_pb2.FunctionPutOutputsItem]) -> api_pb2.FunctionGetOutputsItem:
    if not outputs:  # the container ended without an output: a lost input, to the server
        return api_pb2.FunctionGetOutputsItem(
            result=api_pb2.GenericResult(status=api_pb2.GenericResult.GENERIC_STATUS_INTERNAL_FAILURE)
        )
    (output,) = outputs
    return api_pb2.FunctionGetOutputsItem(result=output.result, data_format=output.data_format)


class AttemptsStub:
    """The server as the client's retry loop sees it: one output per attempt, retries recorded."""

    def __init__(self, attempts: list[api_pb2.FunctionGetOutputsItem]) -> None:
        self.attempts, self.retries_requested = list(attempts), 0

    async def FunctionGetOutputs(self, request: Any, **_: Any) -> api_pb2.FunctionGetOutputsResponse:
        return api_pb2.FunctionGetOutputsResponse(outputs=[self.attempts.pop(0)])

    async def FunctionRetryInputs(self, request: Any, **_: Any) -> None:
        self.retries_requested += 1


def _retries_spent(attempts: list[api_pb2.FunctionGetOutputsItem], monkeypatch) -> tuple[int, int, Any]:
    """(retries counted against the policy, attempts retried in all, the call's outcome) for a 10-retry function."""
    counted = []
    original = RetryManager.get_delay_ms

    def counting(self: RetryManager) -> float | None:
        delay = original(self)
        if delay is not None:
            counted.append(delay)
        return delay

    monkeypatch.setattr(RetryManager, "get_delay_ms", counting)
    stub = AttemptsStub(attempts)
    context = _RetryContext(
        function_call_invocation_type=api_pb2.FUNCTION_CALL_INVOCATION_TYPE_SYNC,
        retry_policy=api_pb2.FunctionRetryPolicy(retries=10, initial_delay_ms=0, backoff_coefficient=1.0),
        function_call_jwt="jwt",
        input_jwt="input-jwt",
        input_id="in-1",
        item=api_pb2.FunctionPutInputsItem(),
        sync_client_retries_enabled=True,
    )
    invocation = _Invocation(stub, "fc-1", None, context)  # type: ignore[arg-type]
    try:
        outcome: Any = asyncio.run(invocation.run_function())
    except Exception as err:  # a terminal failure or cancellation, as the caller would see it
        outcome = err
    return len(counted), stub.retries_requested, outcome


@pytest.mark.parametrize(
    "stop, counted, retried",
    [
        pytest.param(InterruptedBySignal(signal.SIGINT), 0, 1, id="preemption-after-checkpoint"),
        pytest.param(ForcedStop(signal.SIGINT), 0, 1, id="preemption-forced-before-checkpoint"),
        pytest.param(TrainingProcessFailed("rank 1 exited", signum=signal.SIGTERM), 0, 1, id="preemption-of-workers"),
        pytest.param(StoppedAtDeadline(), 1, 1, id="deadline"),
        pytest.param(RuntimeError("CUDA error: an illegal memory access"), 1, 1, id="crash"),
    ],
)
def test_each_stop_spends_what_modal_intends_and_the_retry_completes(
    stop, counted: int, retried: int, monkeypatch
) -> None:
    attempts = [_as_the_server_reports(_outputs_of(stop)), _as_the_server_reports(_outputs_of(None))]
    spent, requested, outcome = _retries_spent(attempts, monkeypatch)
    assert (spent, requested) == (counted, retried)
    assert outcome == COMPLETED  # the next attempt resumed and finished


def test_a_cancellation_is_terminal_and_never_retried(monkeypatch) -> None:
    (output,) = _outputs_of(InterruptedBySignal(signal.SIGUSR1))
    assert output.result.status == api_pb2.GenericResult.GENERIC_STATUS_TERMINATED
    spent, requested, outcome = _retries_spent([_as_the_server_reports([output])], monkeypatch)
    assert (spent, requested) == (0, 0) and isinstance(outcome, Exception)


def test_ten_preemptions_do_not_end_a_run_with_ten_retries(monkeypatch) -> None:
    """Before, each preemption was a FAILURE: the tenth ended the run. Now none is counted."""
    preempted = _as_the_server_reports(_outputs_of(InterruptedBySignal(signal.SIGINT)))
    attempts = [preempted] * 10 + [_as_the_server_reports(_outputs_of(None))]
    spent, requested, outcome = _retries_spent(attempts, monkeypatch)
    assert (spent, requested, outcome) == (0, 10, COMPLETED)


def test_a_user_error_is_a_result_and_never_retried(monkeypatch) -> None:
    def body(_job: Any) -> Any:
        return {"state": "failed", "error": "data.path: missing.jsonl does not exist", "exit_code": 2}

    outputs, _ = run_in_modal_runtime(body, ([],))
    spent, requested, outcome = _retries_spent([_as_the_server_reports(outputs)], monkeypatch)
    assert (spent, requested) == (0, 0) and outcome["state"] == "failed"
