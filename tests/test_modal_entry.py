"""The Modal app, offline: its real settings through `fn.info()`, GPU spec checks, and the function bodies
run in-process against a fake Volume (no Modal servers are reached)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from types import ModuleType

import pytest
import yaml
from conftest import run_cli
from helpers import REPO, FakeVolume
from modal._utils.async_utils import synchronizer
from modal_fakes import RecordingFunction, completed_run
from omegaconf import ListConfig

from noesis_accel.cloud import modal_submit
from noesis_accel.cloud.modal_job import hydra_overrides
from noesis_accel.config import MODAL_GPU_TYPES, compose, gpu_specs, validate
from noesis_accel.core.errors import ConfigError

ENTRY = REPO / "launch" / "modal_entry.py"


def load_app(overrides: list[str], monkeypatch) -> ModuleType:
    """Import launch/modal_entry.py as `modal run launch/modal_entry.py <overrides>` would declare it.

    Registered in sys.modules (for this test), as Modal's CLI registers it: its functions are then
    imported by name in the container, and the sweep coordinator can name its training function.
    """
    monkeypatch.setenv("NOESIS_MODAL_OVERRIDES", json.dumps(overrides))
    name = f"modal_entry_{abs(hash(tuple(overrides)))}"
    spec = importlib.util.spec_from_file_location(name, ENTRY)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def test_the_noesis_recipe_runs_on_eight_h100_with_retries_volume_and_secret(monkeypatch) -> None:
    app = load_app(["+experiment=noesis"], monkeypatch)
    info = app.train.info()
    assert info.gpus == [("H100", 8)]
    assert info.timeout == 6 * 3600 and info.max_retries == 10
    assert info.single_use_containers  # every retry in a fresh container
    assert info.cluster_info is None and not hasattr(app, "train_cluster")
    assert {path: mount.name for path, mount in info.volumes.items()} == {"/vol": "noesis-training-data"}
    assert any("huggingface-token" in secret for secret in info.secrets)
    assert app.training_function() is app.train


def test_sixteen_gpus_run_as_a_cluster_of_two_full_containers(monkeypatch) -> None:
    app = load_app(["+experiment=noesis", "modal.gpu=H100:16", "train.micro_batch_size=1"], monkeypatch)
    info = app.train_cluster.info()
    assert info.gpus == [("H100", 8)] and info.cluster_info.size == 2 and info.cluster_info.rdma
    assert info.timeout == 6 * 3600 and info.max_retries == 10
    assert app.training_function() is app.train_cluster


def test_a_list_of_gpu_types_is_declared_in_the_order_modal_tries_them(monkeypatch) -> None:
    """`modal.gpu=[...]`: one function whose GPU request lists every type, in order, with the common count."""
    app = load_app(["+experiment=noesis", "modal.gpu=[H100:8,H200:8,A100-80GB:8]"], monkeypatch)
    assert app.train.info().gpus == [("H100", 8), ("H200", 8), ("A100-80GB", 8)]
    # What the decorator was given, as `modal shell` would replay it: a list, not one spec.
    assert synchronizer._translate_in(app.train)._spec.gpus == ["H100:8", "H200:8", "A100-80GB:8"]
    assert app.SETTINGS.gpu_type == "H100" and app.SETTINGS.gpus_per_container == 8
    assert app.SETTINGS.containers == 1 and app.training_function() is app.train
    # Evaluation takes one GPU, falling back the same way.
    assert app.evaluate.info().gpus == [("H100", 1), ("H200", 1), ("A100-80GB", 1)]
    line = modal_submit.describe_submission(app.SETTINGS, compose(["+experiment=noesis"]))
    assert line.startswith("modal: noesis on 1 x H100:8, falling back to H200:8, then A100-80GB:8 (timeout 6 h")


def test_a_list_of_sixteen_gpu_types_is_a_cluster_of_full_containers_of_each(monkeypatch) -> None:
    app = load_app(["+experiment=noesis", "modal.gpu=[H100:16,H200:16]", "train.micro_batch_size=1"], monkeypatch)
    info = app.train_cluster.info()
    assert info.gpus == [("H100", 8), ("H200", 8)] and info.cluster_info.size == 2
    line = modal_submit.describe_submission(app.SETTINGS, compose(["+experiment=noesis"]))
    assert line.startswith("modal: noesis on 2 x H100:8, falling back to H200:8 (timeout")


def test_h100_with_a_bang_is_passed_to_modal_as_written(monkeypatch) -> None:
    """`H100!` pins the type (a plain `H100` may be served with an H200); Hydra needs it quoted."""
    app = load_app(["+experiment=noesis", "modal.gpu=['H100!:8',H200:8]"], monkeypatch)
    assert app.train.info().gpus == [("H100!", 8), ("H200", 8)]


def test_one_gpu_spec_is_still_declared_as_one_string(monkeypatch) -> None:
    app = load_app(["+experiment=noesis"], monkeypatch)
    assert synchronizer._translate_in(app.train)._spec.gpus == "H100:8"
    assert app.evaluate.info().gpus == [("H100", 1)]
    line = modal_submit.describe_submission(app.SETTINGS, compose(["+experiment=noesis"]))
    assert line.startswith("modal: noesis on 1 x H100:8 (timeout 6 h")


def test_gpu_specs_lists_the_entries_in_order() -> None:
    assert gpu_specs(None) == [] and gpu_specs("") == []
    assert gpu_specs("H100:8") == ["H100:8"]
    assert gpu_specs(ListConfig(["H100:8", "H200:8"])) == ["H100:8", "H200:8"]
    assert gpu_specs(["A100-80GB:4", "H100:4"]) == ["A100-80GB:4", "H100:4"]
    assert gpu_specs(compose(["+experiment=noesis"])) == ["H100:8"]  # the whole config: its modal.gpu
    assert gpu_specs(compose(["+experiment=noesis", "modal.gpu=[H100:8,H200:8]"])) == ["H100:8", "H200:8"]
    assert gpu_specs(compose([])) == []  # the CPU demo
    with pytest.raises(ValueError, match="8 is not a GPU spec"):
        gpu_specs(ListConfig(["H100:8", 8]))


def test_settings_follow_the_config(monkeypatch) -> None:
    app = load_app(
        ["+experiment=noesis", "modal.timeout_s=7200", "modal.retries=3", "modal.volume=other", "modal.secret=null"],
        monkeypatch,
    )
    info = app.train.info()
    assert info.timeout == 7200 and info.max_retries == 3
    assert [m.name for m in info.volumes.values()] == ["other"]
    assert not any("huggingface" in secret for secret in info.secrets)


def test_more_secrets_follow_the_hugging_face_one_each_once(monkeypatch) -> None:
    """`modal.secrets` adds Secrets (a tracker's API key) after `modal.secret`; naming that one again is harmless."""
    app = load_app(["+experiment=noesis", "modal.secrets=[wandb,huggingface-token]"], monkeypatch)
    named = [secret for secret in app.train.info().secrets if "Secret.from_name" in secret]
    assert named == ["modal.Secret.from_name('huggingface-token')", "modal.Secret.from_name('wandb')"]
    assert app.SETTINGS.secrets == ("huggingface-token", "wandb")
    app = load_app(["+experiment=noesis", "modal.secret=null", "modal.secrets=[mlflow]"], monkeypatch)
    assert [s for s in app.export.info().secrets if "Secret.from_name" in s] == ["modal.Secret.from_name('mlflow')"]


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            "H100:10",
            "so 10 GPUs cannot be placed; use H100:8 (one container; global batch 80 kept as micro 2 x "
            "accumulation 5 x 8) or H100:16 (a cluster of 2 x 8; global batch 80 kept as micro 1 x "
            "accumulation 5 x 16)",
        ),
        (
            "H100:16",
            "train.global_batch_size=80 is not micro_batch_size (2) x accumulation x 16 GPUs for any whole "
            "accumulation; set train.micro_batch_size for one of: micro 1 x accumulation 5 x 16",
        ),
        ("H100:12", "12 GPUs cannot be placed"),
        ("H100:0", "the GPU count must be >= 1"),
        ("V100:8", "unknown GPU type 'V100'"),
        ("H100:eight", "GPU count 'eight' is not a whole number"),
    ],
)
def test_impossible_gpu_specs_are_refused_with_the_options(spec: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(compose(["+experiment=noesis", f"modal.gpu={spec}"]))
    assert f"modal.gpu: {spec}: " in str(err.value) and message in str(err.value)


def test_single_gpu_spec_messages_are_whole_lines_as_before() -> None:
    """A single spec keeps its messages word for word: `modal.gpu: SPEC: reason`, nothing about lists."""
    for spec, line in [
        ("V100:8", f"modal.gpu: V100:8: unknown GPU type 'V100'; Modal offers {', '.join(MODAL_GPU_TYPES)}"),
        ("H100:0", "modal.gpu: H100:0: the GPU count must be >= 1"),
    ]:
        with pytest.raises(ConfigError) as err:
            validate(compose(["+experiment=noesis", f"modal.gpu={spec}"]))
        assert f"  - {line}" in str(err.value).splitlines()


@pytest.mark.parametrize(
    "value, messages",
    [
        (
            "[H100:8,X9:8]",
            [f"modal.gpu: [H100:8, X9:8]: X9:8: unknown GPU type 'X9'; Modal offers {', '.join(MODAL_GPU_TYPES)}"],
        ),
        (
            "[H100:8,H200:4]",
            [
                "modal.gpu: [H100:8, H200:4]: every entry must ask for the same number of GPUs (H100:8 asks for 8, "
                "H200:4 asks for 4), since the process layout and the cluster size are fixed when the app is "
                "declared; e.g. [H100:8, H200:8]"
            ],
        ),
        (
            "[H100:10,H200:10]",  # every entry is checked as a single spec is, each named
            [
                "modal.gpu: [H100:10, H200:10]: H100:10: a container holds at most 8 GPUs",
                "modal.gpu: [H100:10, H200:10]: H200:10: a container holds at most 8 GPUs",
                "use H200:8 (one container; global batch 80 kept as micro 2 x accumulation 5 x 8) or H200:16",
            ],
        ),
        ("[H100:16,H200:16]", ["modal.gpu: [H100:16, H200:16]: H200:16: train.global_batch_size=80 is not"]),
        ("[]", ["modal.gpu: []: an empty list asks for no GPU"]),
        ("[H100:8,8]", ["modal.gpu: [H100:8, 8]: 8 is not a GPU spec; write each entry as TYPE:COUNT"]),
    ],
)
def test_impossible_gpu_lists_are_refused_naming_the_entry(value: str, messages: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        validate(compose(["+experiment=noesis", f"modal.gpu={value}"]))
    assert all(message in str(err.value) for message in messages), str(err.value)


def test_gpu_types_without_brackets_read_as_a_sweep_and_say_so() -> None:
    with pytest.raises(ConfigError, match=re.escape("GPU types to fall back on are a list: modal.gpu=[H100:8,H200:8]")):
        hydra_overrides(["+experiment=noesis", "modal.gpu=H100:8,H200:8"])


def test_valid_gpu_specs_pass() -> None:
    validate(compose(["+experiment=noesis"]))
    validate(compose(["+experiment=noesis", "modal.gpu=H100:16", "train.micro_batch_size=1"]))
    validate(compose(["+experiment=noesis", "modal.gpu=A100-80GB:4"]))
    validate(compose(["+experiment=noesis", "modal.gpu=[H100:8,H200:8,A100-80GB:8]"]))
    validate(compose(["+experiment=noesis", "modal.gpu=[H100:16,H200:16]", "train.micro_batch_size=1"]))


def test_a_bad_gpu_spec_fails_the_same_way_on_the_cli_and_in_the_app(tmp_path) -> None:
    cli = run_cli(["+experiment=noesis", "modal.gpu=H100:10", f"run.root={tmp_path}"])
    assert cli.returncode == 2 and "Traceback" not in cli.stderr
    assert "modal.gpu: H100:10: a container holds at most 8 GPUs" in cli.stderr
    app = subprocess.run(
        [sys.executable, str(ENTRY), "+experiment=noesis", "modal.gpu=H100:10"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "NOESIS_MODAL_OVERRIDES"},
    )
    assert app.returncode == 2 and "Traceback" not in app.stderr
    assert "modal.gpu: H100:10: a container holds at most 8 GPUs" in app.stderr
    assert not list(tmp_path.iterdir())  # nothing was written


def test_the_entrypoint_forwards_the_overrides_unchanged(monkeypatch, capsys) -> None:
    args = [
        "+experiment=tiny",
        "train.max_steps=2",
        "optim.lr=3e-4",
        "+debug=cpu",
        "peft.target_modules=[q_proj,v_proj]",
    ]
    app = load_app(args, monkeypatch)
    recorder = RecordingFunction("train", completed_run)
    monkeypatch.setattr(app, "training_function", lambda: recorder)
    app.main.info.raw_f(*args)
    assert recorder.spawned == [args] and not recorder.remote_calls  # spawned: Modal's server drives the retries
    assert "watch it with: modal run launch/modal_entry.py::status tiny-debug" in capsys.readouterr().out


def test_the_function_body_trains_the_cli_config_and_commits_it_to_the_volume(tmp_path, monkeypatch, capsys) -> None:
    """`train.local(overrides)` in-process: the container's body with a Volume that keeps only commits."""
    mount, remote = tmp_path / "vol", tmp_path / "remote"
    local = tmp_path / "container-disk"
    args = [
        "+experiment=tiny",
        "train.max_steps=2",
        "ckpt.every=1",
        "modal.secret=null",
        f"modal.mount={mount}",
        f"modal.scratch_dir={local}",
    ]
    app = load_app(args, monkeypatch)
    volume = FakeVolume.mount(mount, remote)
    monkeypatch.setattr(app, "volume", volume)
    result = app.train.local(args)
    assert result["state"] == "completed" and result["step"] == 2
    saved = yaml.safe_load((remote / "runs" / "tiny" / "config.yaml").read_text())  # on the remote: committed
    # What must last on the Volume; what is held open while training on the container's own disk.
    cli = compose(
        args
        + [
            f"run.root={mount}/runs",
            f"data.cache_dir={local}/cache/data",
            f"data.persistent_cache_dir={mount}/cache/data",
            f"model.cache_dir={mount}/cache/models",
            f"train.tracker_dir={local}/tracker",
        ]
    )
    from omegaconf import OmegaConf

    assert saved == OmegaConf.to_container(cli, resolve=True)  # the same config noesis-train composes
    assert volume.commits >= 3  # two checkpoints and the exit
    app.status.local("tiny")  # `modal run launch/modal_entry.py::status tiny`, in-process
    out = capsys.readouterr().out
    assert "state:       completed" in out and "step 2 / 2 (100%)" in out and "attempts:    1" in out
    # After training, on the Volume: the same commands, their output committed.
    app.report.local("tiny")
    app.export.local("tiny")
    assert (remote / "runs" / "tiny" / "report" / "training.png").is_file()
    assert (remote / "runs" / "tiny" / "export" / "config.json").is_file()
    with pytest.raises(SystemExit) as refused:
        app.export.local("nothing-here")
    assert refused.value.code == 2


@pytest.mark.slow
def test_secrets_never_reach_output_files_or_errors(tmp_path) -> None:
    token = "hf_SeCrEtToKeNvAlUe123"
    env = {"HF_TOKEN": token}
    data = tmp_path / f"data-{token}.jsonl"  # a careless path: the token must still not be echoed
    data.write_text(
        "".join(
            json.dumps(
                {"messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": f"A{i}."}]}
            )
            + "\n"
            for i in range(60)
        )
    )
    trained = run_cli(
        ["+experiment=tiny", "train.max_steps=2", "ckpt.every=1", f"data.path={data}", f"run.root={tmp_path / 'runs'}"],
        env=env,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    failed = run_cli(
        ["+experiment=tiny", f"data.path={tmp_path / token}.jsonl", f"run.root={tmp_path / 'runs2'}"], env=env
    )
    assert failed.returncode == 2 and "***" in failed.stderr
    for text in (trained.stdout, trained.stderr, failed.stdout, failed.stderr):
        assert token not in text
    for file in (tmp_path / "runs").rglob("*"):
        if file.is_file() and file.suffix in (".yaml", ".json", ".jsonl"):
            assert token not in file.read_text(errors="replace"), file
