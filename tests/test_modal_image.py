"""The Modal image, offline: the files each of its mounts would upload (listed by Modal's own code),
what it pip-installs, and the CPU smoke entry training the sample data the image carries."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import FakeVolume
from modal._image import _Image
from modal._utils.async_utils import synchronizer
from modal.mount import _Mount, _select_files
from modal_fakes import RecordingFunction
from test_modal_entry import load_app

from noesis_accel.cloud.modal_image import PYPROJECT
from noesis_accel.config import CONF_DIR, compose
from noesis_accel.rundir.layout import RunDir

# In-process bodies of functions that mount a Volume: Modal warns that a local run has none.
pytestmark = pytest.mark.filterwarnings("ignore:The .* function is executing locally")

PROJECT = CONF_DIR.parent


def _reachable(root: Any, kind: type) -> list[Any]:
    """Every Modal object of `kind` that `root` depends on (an image's layers, their mounts, ...)."""
    found, todo, seen = [], [root], set()
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, kind):
            found.append(obj)
        todo.extend(obj._deps_())
    return found


def uploads(function: Any) -> dict[str, Path]:
    """Container path -> local file, for every file this machine uploads for `function`'s containers.

    The image's mount layers (`add_local_python_source`, `add_local_dir`, `add_local_file`) and the
    function's own source mount, each listed by `_select_files`, the listing Modal's upload runs
    (`_Mount._batched_get_missing_files`). Modal's client mount comes from its servers: not listed.
    """
    spec = synchronizer._translate_in(function)._spec
    mounts = [*_reachable(spec.image, _Mount), *(m for m in spec.mounts if m.is_local())]
    return {str(remote): local for mount in mounts for local, remote in _select_files(mount.entries)}


def pip_installs(function: Any) -> list[str]:
    """The `pip install` commands of the image's layers, from each layer's own Dockerfile function."""
    commands = []
    for image in _reachable(synchronizer._translate_in(function)._spec.image, _Image):
        dockerfile = inspect.getclosurevars(image._load).nonlocals.get("dockerfile_function")
        if dockerfile is not None:
            commands += [c for c in dockerfile("2025.06").commands if "pip install" in c]
    return commands


def _in_container(local: str | Path) -> str:
    """Where a file of this checkout is in the container: the image puts the project's files under /root."""
    return "/root/" + Path(local).resolve().relative_to(PROJECT).as_posix()


def test_every_file_the_code_reads_is_uploaded(monkeypatch) -> None:
    app = load_app(["+experiment=noesis"], monkeypatch)
    files = uploads(app.train)
    demo, recipe = compose([]), compose(["+experiment=noesis"])
    # What the configs point at, resolved on this machine: each lands where the container resolves it.
    read = [demo.data.path, demo.eval.prompts, recipe.distributed.deepspeed_config, CONF_DIR / "config.yaml", PYPROJECT]
    for local in read:
        assert files.get(_in_container(local)) == Path(local).resolve(), local
    for expected in (
        "/root/noesis_accel/assets/noesis_sample.jsonl",
        "/root/noesis_accel/assets/noesis_eval_prompts.jsonl",
        "/root/conf/deepspeed/zero2.json",
        "/root/noesis_accel/__init__.py",
        "/root/hydra_plugins/noesis_modal_launcher/modal_launcher.py",
        "/root/modal_entry.py",
    ):
        assert expected in files, expected
    conf = {_in_container(p) for p in CONF_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert conf <= files.keys()  # the whole tree: every group a command line can name
    assert not [r for r in files if "__pycache__" in r or r.endswith(".pyc") or "/." in r]
    for function in (app.sweep, app.check_data, app.status, app.export):  # every function gets the same files
        assert uploads(function).keys() == files.keys()


def test_the_image_carries_our_hydra_plugin_and_no_one_elses(tmp_path, monkeypatch) -> None:
    """`hydra_plugins` is a namespace package: every installed plugin shares it, and uploading the whole
    namespace would ship their code without their dependencies."""
    foreign = tmp_path / "site" / "hydra_plugins" / "someone_elses_launcher"
    foreign.mkdir(parents=True)
    (foreign / "__init__.py").write_text("import a_dependency_the_image_lacks\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for name in [m for m in sys.modules if m == "hydra_plugins" or m.startswith("hydra_plugins.")]:
        monkeypatch.delitem(sys.modules, name)  # the namespace is found again, with the foreign folder in it
    import importlib

    importlib.invalidate_caches()
    app = load_app(["+experiment=noesis"], monkeypatch)
    plugins = sorted(remote for remote in uploads(app.train) if "/hydra_plugins/" in remote)
    assert plugins and all(p.startswith("/root/hydra_plugins/noesis_modal_launcher/") for p in plugins), plugins


def test_the_image_installs_the_project_without_modal_and_the_extras_the_config_needs(monkeypatch) -> None:
    def project_install(overrides: list[str]) -> str:
        app = load_app(overrides, monkeypatch)
        return next(c for c in pip_installs(app.train) if "transformers" in c)

    plain = project_install(["+experiment=noesis"])
    assert "'deepspeed>=0.17'" in plain and "'hydra-core>=1.3.2,<1.4'" in plain
    assert "modal" not in plain  # Modal's runtime brings its own client
    assert "liger" not in plain
    liger = project_install(["+experiment=noesis", "model.liger=true"])
    assert "'liger-kernel>=0.8.5'" in liger and "modal" not in liger
    assert "wandb" not in plain and "mlflow" not in plain
    assert "'wandb>=0.19'" in project_install(["+experiment=noesis", "train.tracker=wandb"])  # the tracker chosen
    assert "'mlflow-skinny>=2.10'" in project_install(["+experiment=noesis", "train.tracker=mlflow"])


def test_a_tracker_the_image_cannot_install_is_refused_before_any_gpu_starts(monkeypatch, capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        load_app(["+experiment=noesis", "train.tracker=aim"], monkeypatch)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert (
        "train.tracker=aim: the Modal image installs no package for it; on Modal use tensorboard, wandb, "
        "mlflow or none" in err
    )
    assert "Traceback" not in err


def test_a_misspelled_extra_is_refused_in_one_line_naming_the_known_ones(monkeypatch, capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        load_app(["+experiment=noesis", "modal.extras=[gpus]"], monkeypatch)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert (
        "modal.extras: 'gpus' is not an optional dependency group of this project; known extras: bench, dev, gguf, "
        "gpu, mlflow, test, wandb" in err
    )
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "model",
    [
        ["model=tiny"],  # the demo's data and settings on the 2-layer model: seconds
        pytest.param([], marks=pytest.mark.slow),  # the demo's own SmolLM2-135M: about two minutes on a CPU
    ],
    ids=["tiny-model", "demo-model"],
)
def test_the_cpu_smoke_entry_trains_the_sample_data_the_image_carries(model, tmp_path, monkeypatch, capsys) -> None:
    """`modal run launch/modal_entry.py` (the demo, cut to two steps), with the container's body run
    in-process on a fake Volume: the data it trained on is the file the image uploads to /root."""
    mount, remote = tmp_path / "vol", tmp_path / "remote"
    args = [*model, "train.max_steps=2", "train.progress_bar=false", "modal.secret=null", f"modal.mount={mount}"]
    app = load_app(args, monkeypatch)
    monkeypatch.setattr(app, "volume", FakeVolume.mount(mount, remote))
    container = RecordingFunction("train", lambda overrides: app.train.local(overrides))
    monkeypatch.setattr(app, "training_function", lambda: container)
    app.main.info.raw_f(*args)
    assert container.spawned == [args]
    run = RunDir(remote / "runs" / "demo")  # on the remote: committed
    assert run.status()["state"] == "completed" and run.status()["step"] == 2
    trained_on = yaml.safe_load(run.config_file.read_text())["data"]["path"]
    assert uploads(app.train)["/root/noesis_accel/assets/noesis_sample.jsonl"] == Path(trained_on).resolve()
    assert "modal: completed at step 2/2" in capsys.readouterr().out


@pytest.mark.slow
def test_a_container_made_of_the_uploads_alone_trains_the_sample_data(tmp_path, monkeypatch) -> None:
    """The process boundary is the point: a fresh interpreter in a /root built only from the files
    the image uploads imports the app as the container does, and trains the sample data from there."""
    args = [
        "model=tiny",
        "train.max_steps=2",
        "train.progress_bar=false",
        "modal.secret=null",
        f"modal.mount={tmp_path / 'vol'}",
    ]
    app = load_app(args, monkeypatch)
    root = tmp_path / "root"
    for remote, local in uploads(app.train).items():
        target = tmp_path / remote.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(local, target)
    # As Modal's container: cwd /root on the path, `import modal_entry`, a function's body. The training
    # function's, then the sweep coordinator's (its launcher plugin found in /root; jobs recorded, not run).
    script = (
        f"import sys; sys.path.append({str(Path(__file__).parent)!r})\n"
        "import modal_entry\n"
        "from helpers import FakeVolume\n"
        "from modal_fakes import RecordingFunction\n"
        "from hydra.core.utils import JobReturn, JobStatus\n"
        f"modal_entry.volume = FakeVolume.mount({str(tmp_path / 'vol')!r}, {str(tmp_path / 'remote')!r})\n"
        f"print('trained:', modal_entry.train.local({args!r})['state'])\n"
        "jobs = RecordingFunction('train', lambda job: JobReturn(status=JobStatus.COMPLETED, _return_value=0.5))\n"
        "modal_entry.training_function = lambda: jobs\n"
        f"swept = modal_entry.sweep.local(['-m', *{args!r}, 'optim.lr=1e-3,2e-3'])\n"
        "print('swept:', [job['state'] for job in swept['jobs']], len(jobs.spawned))\n"
        "print('from:', sys.modules['noesis_accel'].__file__,"
        " sys.modules['hydra_plugins.noesis_modal_launcher.modal_launcher'].__file__)\n"
    )
    env = {**os.environ, "NOESIS_MODAL_OVERRIDES": json.dumps(args), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith(("trained:", "swept:", "from:"))]
    assert lines == [
        "trained: completed",
        "swept: ['completed', 'completed'] 2",
        f"from: {root}/noesis_accel/__init__.py {root}/hydra_plugins/noesis_modal_launcher/modal_launcher.py",
    ]
    saved = yaml.safe_load(RunDir(tmp_path / "remote" / "runs" / "demo").config_file.read_text())
    assert saved["data"]["path"] == str(root / "noesis_accel" / "assets" / "noesis_sample.jsonl")


def test_an_export_asking_for_gguf_gets_llama_cpp_and_a_compiler_in_its_image(monkeypatch) -> None:
    from noesis_accel.cloud import modal_job

    argv = ["modal", "run", "launch/modal_entry.py::export", "noesis", "gguf=q4_k_m", "modal.extras=[wandb]"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delenv("NOESIS_MODAL_OVERRIDES", raising=False)
    overrides = modal_job.overrides_at_import()
    assert overrides == ["modal.extras=[wandb,gguf]"]  # the user's extras kept
    monkeypatch.setattr(sys, "argv", argv[:4])
    assert modal_job.overrides_at_import() == []  # a plain export: no compiler, no llama.cpp

    app = load_app(overrides, monkeypatch)
    installs = " ".join(pip_installs(app.export))
    assert "llama-cpp-python" in installs and "wandb" in installs
    apt = [
        command
        for image in _reachable(synchronizer._translate_in(app.export)._spec.image, _Image)
        if (dockerfile := inspect.getclosurevars(image._load).nonlocals.get("dockerfile_function")) is not None
        for command in dockerfile("2025.06").commands
        if "apt-get install" in command
    ]
    assert any("build-essential" in command and "cmake" in command for command in apt), apt
    plain = load_app(["+experiment=noesis"], monkeypatch)
    assert "llama-cpp-python" not in " ".join(pip_installs(plain.export))
