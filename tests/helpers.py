"""Test helpers shared by the crash, resume, launcher and Modal tests: written once, used everywhere."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file

from noesis_accel.config import Config, compose, to_config
from noesis_accel.rundir.layout import RunDir

REPO = Path(__file__).resolve().parent.parent


def step_losses(run_dir: Path) -> dict[int, float]:
    """The logged training loss of every step, by step."""
    return {m["step"]: m["loss"] for m in RunDir(run_dir).metrics() if "loss" in m}


def adapter_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(RunDir(run_dir).adapter / "adapter_model.safetensors"))


def assert_same_adapter(run_dir: Path, reference: Path) -> None:
    ours, theirs = adapter_weights(run_dir), adapter_weights(reference)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def mark_interrupted(run_dir: Path) -> None:
    """Make a completed run look as if it died, so a restart tries to resume it."""
    status_file = RunDir(run_dir).status_file
    status = json.loads(status_file.read_text())
    status["state"] = "interrupted"
    status_file.write_text(json.dumps(status))


def resumed_step(output: str) -> int:
    """The step a restart resumed at, from its 'resumed from ... at step N/M' line."""
    line = next(text for text in output.splitlines() if "resumed from " in text)
    return int(line.split("at step ")[1].split("/")[0])


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def logged_step(run_dir: Path) -> int:
    """The newest step in metrics.jsonl (0 before the first)."""
    return max(step_losses(run_dir), default=0)


def start_in_group(command: list[str], env: dict | None = None, **popen: object) -> subprocess.Popen:
    """`command` in the background from the repo, in its own process group (so a test can signal or
    kill all of it), its output unbuffered and captured."""
    return subprocess.Popen(
        command,
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        **popen,
    )


def start_cli(args: list[str], env: dict | None = None, **popen: object) -> subprocess.Popen:
    """`python -m noesis_accel.processes.train ARGS` in the background, in its own process group."""
    return start_in_group([sys.executable, "-m", "noesis_accel.processes.train", *args], env, **popen)


def children_of(pid: int) -> list[int]:
    """Direct children of a process (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children = (task / "children").read_text().split() if (task / "children").exists() else []
        found += [int(c) for c in children]
    return found


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for a parent that no longer reaps it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def kill_group(process: subprocess.Popen, signum: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False) -> Iterator[Path | None]:
    """A small filesystem of its own at `path` (to fill, or to make read-only); None if mounting is impossible."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = (
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0
    )
    try:
        yield path if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def resize_tmpfs(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True, capture_output=True)


@contextlib.contextmanager
def read_only_dir(path: Path) -> Iterator[str | None]:
    """`path` made unwritable: a read-only mount as root (who ignores permissions), else mode 555.

    Yields how (the words the error should use), or None if neither works here.
    """
    if os.geteuid() != 0:
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o555)
        try:
            yield "permission denied"
        finally:
            path.chmod(0o755)
        return
    with tmpfs(path, "1m", read_only=True) as mounted:
        yield "read-only file system" if mounted else None


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (Linux /proc)."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            pending += children_of(current)
    return found


def open_files_under(root: Path, pids: list[int]) -> str | None:
    """What keeps `root` busy for these processes (a cwd, an open file, a memory map), or None.

    As `modal.volume._open_files_error_annotation` words it, with memory maps added: a mapped file
    is open too, though it has no descriptor.
    """
    root = Path(root).resolve()

    def under(path: str) -> str | None:
        with contextlib.suppress(ValueError):
            return str(Path(path.removesuffix(" (deleted)")).relative_to(root))
        return None

    for pid in pids:
        proc = Path(f"/proc/{pid}")
        try:
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            if under(os.readlink(proc / "cwd")) is not None:
                return f"cwd of '{command}' is inside volume"
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(FileNotFoundError):
                    if (name := under(os.readlink(fd))) is not None:
                        return f"path {name} is open from '{command}'"
            for line in (proc / "maps").read_text().splitlines():
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and (name := under(parts[5])) is not None:
                    return f"path {name} is memory-mapped by '{command}'"
        except (FileNotFoundError, ProcessLookupError):
            continue  # the process exited meanwhile
    return None


class FakeVolume:
    """A Modal Volume as one container sees it: a private view, and a remote store that keeps only commits.

    `commit()` copies what this container changed into `remote` (and removes what it deleted), then
    reloads, as `modal.Volume.commit` does; `reload()` brings other containers' commits into the view.
    Modal's reload rule holds: a reload (so a commit too) fails while any process of the container
    (`container_pid` and its descendants) has a file under the mount open, memory-mapped or as its
    cwd; the commit's files have reached the remote by then, as Modal's commit RPC precedes its
    reload. A background thread can commit every `background_s` seconds, as Modal does, so
    half-written files reach the remote too. A container that dies takes its uncommitted changes
    with it: restart from `FakeVolume.mount(remote)` alone. `commit_s`: each commit's server side takes
    this long first (a slow Volume); the background snapshots are not slowed.
    """

    def __init__(
        self,
        view: Path,
        remote: Path,
        background_s: float | None = None,
        container_pid: int | None = None,
        commit_s: float = 0.0,
    ) -> None:
        import threading

        self.commit_s = commit_s
        self.view, self.remote = Path(view), Path(remote)
        self.container_pid = container_pid or os.getpid()
        self.commits = 0
        self.refused: list[str] = []  # every reload refused for open files, with what held it
        self._lock = threading.Lock()
        self._known = self._files(self.view)
        self._stop = threading.Event()
        if background_s:
            threading.Thread(target=self._background, args=(background_s,), daemon=True).start()

    @classmethod
    def mount(cls, view: Path, remote: Path, background_s: float | None = None, commit_s: float = 0.0) -> FakeVolume:
        """A fresh container: its view is exactly what was committed."""
        import shutil

        shutil.rmtree(view, ignore_errors=True)
        Path(remote).mkdir(parents=True, exist_ok=True)
        shutil.copytree(remote, view)
        return cls(view, remote, background_s, commit_s=commit_s)

    @staticmethod
    def _files(root: Path) -> dict[str, tuple[int, int]]:
        found = {}
        for path in Path(root).rglob("*"):
            try:
                if path.is_file():
                    stat = path.stat()
                    found[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
            except FileNotFoundError:  # removed while we looked
                continue
        return found

    def commit(self) -> None:
        if self.commit_s:
            time.sleep(self.commit_s)
        self._persist()
        self.reload()

    def _persist(self) -> None:
        import shutil

        with self._lock:
            current = self._files(self.view)
            for name, signature in current.items():
                if self._known.get(name) != signature or not (self.remote / name).exists():
                    target = self.remote / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        shutil.copyfile(self.view / name, target)
                    except FileNotFoundError:
                        continue
            for name in set(self._known) - set(current):
                (self.remote / name).unlink(missing_ok=True)
            for folder in sorted((p for p in self.remote.rglob("*") if p.is_dir()), reverse=True):
                if not any(folder.iterdir()) and not (self.view / folder.relative_to(self.remote)).is_dir():
                    folder.rmdir()
            self._known = current
            self.commits += 1

    def reload(self) -> None:
        import shutil

        # Checked under the lock: the background snapshot (Modal's, outside the container's processes)
        # lists and copies the view from a thread of this process, and its own handles must not count.
        with self._lock:
            busy = open_files_under(self.view, descendants(self.container_pid))
            if busy is not None:
                self.refused.append(busy)
                raise RuntimeError(f"there are open files preventing the operation: {busy}")
            remote = self._files(self.remote)
            for name in remote:
                target = self.view / name
                if not target.exists() or target.stat().st_size != remote[name][0]:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(self.remote / name, target)
            for name in set(self._known) - set(remote):
                (self.view / name).unlink(missing_ok=True)
            self._known = self._files(self.view)

    def _background(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self._persist()  # Modal's background snapshot: no reload, so no open-file rule
            except OSError:
                pass


def typed(overrides: list[str] | None = None) -> Config:
    """conf/ composed with `overrides` as the code reads it: the schema's dataclasses (`validate` returns these;
    this skips its checks, so a component can be given a config `validate` would refuse)."""
    return to_config(compose(list(overrides or [])))
