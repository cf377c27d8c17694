"""One simulated Modal container, run by Modal's own container runtime code.

    python tests/modal_sim.py VIEW REMOTE [--rank R --address A] [--outputs FILE] [--retry-count N]
                              [--job-file REQUEST.json --result-file RESULT.pkl] OVERRIDES...

It mounts a fresh view of the fake Volume (only what was committed; Modal's reload rule: no open
files under the mount), and hands one input, the training function's arguments, to Modal's own
`modal._container_entrypoint.call_function` with a real `ContainerIOManager` whose client is the
only stand-in: its stub serves the one input and records the outputs the runtime sends. So how a
stop ends (an output or none, and its status) is decided by Modal's code, in the main thread, with
Modal's SIGUSR1 handler installed, as in a real container. After the runtime returns (or a
KeyboardInterrupt leaves it, as the real `__main__` catches it), the container exits gracefully
and Modal commits the Volume once more. The outputs go to `--outputs` as JSON.

Background commits every half second, as Modal does (`NOESIS_SIM_BACKGROUND_S` changes it; 0: none).
`NOESIS_SIM_COMMIT_S=S`: every commit (ours and the exit's) takes S seconds, as a slow Volume's would.
Kill it with SIGKILL to lose the container; send SIGINT (preemption) or SIGUSR1 (cancellation).

Exit codes, for the tests: 0 a SUCCESS output of a finished run, 2 a SUCCESS output of a refused
run (a user error), 3 no output (the preemption path: Modal restarts the input for free), 4
TERMINATED (cancelled), 5 FAILURE (a crash or the deadline: spends a retry), 6 whatever the output,
when the Volume refused a commit's reload because a file under the mount was held open.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import FakeVolume
from modal._container_entrypoint import call_function
from modal._runtime.container_io_manager import ContainerIOManager
from modal._runtime.user_code_event_loop import UserCodeEventLoop
from modal._runtime.user_code_imports import FinalizedFunction
from modal._serialization import deserialize, serialize
from modal.client import _Client
from modal_proto import api_pb2

from noesis_accel.cloud.modal_job import ModalSettings, compose_for_modal, run_job_in_container

EXIT_CODES = {"SUCCESS": 0, "NONE": 3, "TERMINATED": 4, "FAILURE": 5}
REFUSED_RELOAD = 6
FUNCTION_CALL_ID = "fc-simulated"  # every attempt of one call shares it, as Modal's retries do


class RecordingStub:
    """The only stand-in: Modal's API as the runtime calls it for one input, outputs recorded."""

    def __init__(self, item: api_pb2.FunctionGetInputsItem) -> None:
        self.pending = [item]
        self.outputs: list[api_pb2.FunctionPutOutputsItem] = []

    async def FunctionGetInputs(self, request: Any, **_: Any) -> api_pb2.FunctionGetInputsResponse:
        return api_pb2.FunctionGetInputsResponse(inputs=[self.pending.pop(0)] if self.pending else [])

    async def FunctionPutOutputs(self, request: api_pb2.FunctionPutOutputsRequest, **_: Any) -> None:
        self.outputs.extend(request.outputs)


def run_in_modal_runtime(
    body: Any, args: tuple, retry_count: int = 0
) -> tuple[list[api_pb2.FunctionPutOutputsItem], Any]:
    """Call `body(*args)` as Modal's container runtime calls a sync function; (outputs, client)."""
    item = api_pb2.FunctionGetInputsItem(
        input_id="in-simulated",
        retry_count=retry_count,
        function_call_id=FUNCTION_CALL_ID,
        attempt_token=f"attempt-{retry_count}",
        function_call_invocation_type=api_pb2.FUNCTION_CALL_INVOCATION_TYPE_ASYNC,  # .spawn()
        input=api_pb2.FunctionInput(
            args=serialize((args, {})), data_format=api_pb2.DATA_FORMAT_PICKLE, final_input=True
        ),
    )
    stub = RecordingStub(item)
    client = _Client("http://localhost", api_pb2.CLIENT_TYPE_CONTAINER, None)  # never opened: no server
    client._control_plane_stub = stub  # the stub answers for it
    # Outputs above Modal's inline limit go to blob storage, which needs a server: the layout raises
    # the limit, as the server does for a function with an override (`_resolve_output_size_limits`).
    inline = api_pb2.FunctionHandleMetadata(max_object_size_bytes=2**30, max_async_object_size_bytes=2**30)
    container_args = api_pb2.ContainerArguments(
        task_id="ta-simulated",
        function_id="fu-simulated",
        app_id="ap-simulated",
        function_def=api_pb2.Function(function_name="train", single_use_containers=True),
        app_layout=api_pb2.AppLayout(
            objects=[api_pb2.Object(object_id="fu-simulated", function_handle_metadata=inline)]
        ),
    )
    io_manager = ContainerIOManager(container_args, client)
    functions = {
        "": FinalizedFunction(
            callable=body, is_async=False, is_generator=False, supported_output_formats=[api_pb2.DATA_FORMAT_PICKLE]
        )
    }
    try:
        with UserCodeEventLoop() as event_loop:
            call_function(event_loop, io_manager, functions, 0, 0)
    except KeyboardInterrupt:  # as modal/_container_entrypoint.py's __main__: "Container: interrupted"
        pass
    return stub.outputs, client


def describe(outputs: list[api_pb2.FunctionPutOutputsItem], client: Any) -> list[dict[str, Any]]:
    described = []
    for output in outputs:
        status = api_pb2.GenericResult.GenericStatus.Name(output.result.status).removeprefix("GENERIC_STATUS_")
        entry: dict[str, Any] = {"status": status, "exception": output.result.exception}
        if status == "SUCCESS":
            entry["value"] = deserialize(output.result.data, client)
        described.append(entry)
    return described


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("view", type=Path)
    parser.add_argument("remote", type=Path)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--outputs", type=Path, help="where the outputs the runtime sent go (JSON)")
    parser.add_argument("--retry-count", type=int, default=0)
    parser.add_argument("--job-file", type=Path, help="a sweep job's request (JSON) instead of overrides")
    parser.add_argument("--result-file", type=Path, help="where a sweep job's JobReturn goes (pickled)")
    parser.add_argument(
        "--attempt-started", type=float, help="the attempt's start (unix time) its deadline counts from; default now"
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    started = args.attempt_started if args.attempt_started is not None else time.time()
    if os.environ.get("NOESIS_FAULT_KILL_PID") == "container":  # a fault that takes the whole container down
        os.environ["NOESIS_FAULT_KILL_PID"] = str(os.getpid())
    volume = FakeVolume.mount(
        args.view,
        args.remote,
        background_s=float(os.environ.get("NOESIS_SIM_BACKGROUND_S", "0.5")) or None,
        commit_s=float(os.environ.get("NOESIS_SIM_COMMIT_S", "0")),
    )
    local_disk = args.view.parent / (args.view.name + "-local")
    shutil.rmtree(local_disk, ignore_errors=True)  # a new container's own disk starts empty
    scratch = [f"modal.mount={args.view}", f"modal.scratch_dir={local_disk}"]
    if args.job_file:  # a sweep job: its request names its overrides; the container adds where the Volume is
        job: Any = json.loads(args.job_file.read_text())
        job["overrides"] = [*job["overrides"], *scratch]
        overrides = job["overrides"]
    else:
        job = overrides = [*args.overrides, *scratch]
    settings = ModalSettings.from_config(compose_for_modal(overrides), overrides)

    def train(job: Any) -> Any:  # what launch/modal_entry.py's `train` does
        return run_job_in_container(
            job, volume, settings, machine_rank=args.rank, main_address=args.address, attempt_started=started
        )

    outputs = describe(*run_in_modal_runtime(train, (job,), args.retry_count))
    try:
        volume.commit()  # a graceful exit: Modal commits the Volume once more
    except RuntimeError as err:
        print(f"exit-time commit failed: {err}", file=sys.stderr, flush=True)
    if args.outputs:
        args.outputs.write_text(json.dumps(outputs, default=str))
    if args.result_file and outputs and outputs[0]["status"] == "SUCCESS":
        args.result_file.write_bytes(pickle.dumps(outputs[0]["value"]))
    status = outputs[0]["status"] if outputs else "NONE"
    print(f"modal output: {status} {outputs[0].get('value', '') if outputs else ''}", flush=True)
    if volume.refused:  # Modal would have failed these commits: files under the mount were held open
        print(f"volume reloads refused: {volume.refused}", file=sys.stderr, flush=True)
        return REFUSED_RELOAD
    if status == "SUCCESS":
        value = outputs[0]["value"]
        state = value.get("state") if isinstance(value, dict) else "completed"
        return 0 if state in ("completed", "already_completed") else 2
    return EXIT_CODES[status]


if __name__ == "__main__":
    sys.exit(main())
