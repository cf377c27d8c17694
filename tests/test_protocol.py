"""What crosses between the launcher and its workers: the outcome file and the pipe lines."""

from __future__ import annotations

import pytest

from noesis_accel.config.sweeps import task_reference
from noesis_accel.core.protocol import (
    COMMIT_OK,
    COMMIT_REQUEST,
    OutcomeKind,
    WorkerOutcome,
    commit_error,
    commit_failure,
    decode_line,
    decode_stop_request,
    encode_line,
    encode_stop_request,
)
from noesis_accel.processes.train import TASK_REFERENCE, TrainCommand


def test_an_outcome_reads_back_as_it_was_written() -> None:
    outcome = WorkerOutcome(OutcomeKind.INTERRUPTED, "stopped by SIGTERM", 143, signum=15)
    assert WorkerOutcome.from_json(outcome.to_json()) == outcome
    done = WorkerOutcome(OutcomeKind.COMPLETED, result={"state": "completed", "step": 4})
    assert WorkerOutcome.from_json(done.to_json()) == done


@pytest.mark.parametrize("text", ["", "{", "[]", '{"kind": "exploded"}', '{"message": "no kind"}'])
def test_what_is_not_an_outcome_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        WorkerOutcome.from_json(text)


def test_pipe_lines_are_one_line_each_way() -> None:
    assert decode_line(encode_line(COMMIT_REQUEST)) == COMMIT_REQUEST
    assert commit_failure(COMMIT_OK) is None
    reply = decode_line(encode_line(commit_error("OSError: quota\nexceeded")))
    assert commit_failure(reply) == "OSError: quota exceeded"
    assert decode_stop_request(encode_stop_request(15)) == 15


def test_a_sweep_sends_the_command_s_jobs_as_the_importable_task() -> None:
    assert task_reference(TrainCommand())[0] == TASK_REFERENCE == "noesis_accel.processes.train:task"
