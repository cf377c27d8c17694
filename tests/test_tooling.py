"""The checks a contributor runs before committing, run by the default suite so CI enforces them:
ruff's lint and format, the import contracts between the wings, and mypy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _env(cwd: Path) -> dict[str, str]:
    # The repo first on the path: the contracts and mypy check this checkout, not an installed copy.
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), os.environ.get("PYTHONPATH", "")])}


def _run(args: list[str], cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=_env(cwd), capture_output=True, text=True, timeout=timeout)


_mypy: subprocess.Popen | None = None


def start_mypy() -> None:
    """mypy checks the whole import graph (torch's included) on one core for about a minute; tests/conftest.py
    starts it as the session starts, so it runs beside the other tests (most of which keep one core busy)."""
    global _mypy
    if _mypy is None:
        _mypy = subprocess.Popen(
            [sys.executable, "-m", "mypy"], cwd=REPO, env=_env(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )


def _mypy_result(timeout: int) -> subprocess.CompletedProcess:
    start_mypy()  # not started yet when this test is run on its own
    assert _mypy is not None
    try:
        out, err = _mypy.communicate(timeout=timeout)
    finally:
        _mypy.kill()  # after a timeout: no mypy outlives the session
    return subprocess.CompletedProcess(_mypy.args, _mypy.returncode, out.decode(), err.decode())


def _lint_imports(cwd: Path = REPO) -> subprocess.CompletedProcess:
    # import-linter has no `python -m` entry point; its script sits beside this interpreter.
    script = Path(sys.executable).parent / "lint-imports"
    return _run([str(script), "--no-cache", "--no-logo", str(cwd / "pyproject.toml")], cwd=cwd)


def _assert_passes(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"{' '.join(result.args)} failed:\n{result.stdout}{result.stderr}"


def test_ruff_lint_is_clean():
    _assert_passes(_run([sys.executable, "-m", "ruff", "check", "."]))


def test_ruff_format_is_applied():
    _assert_passes(_run([sys.executable, "-m", "ruff", "format", "--check", "."]))


def test_wings_import_only_downward():
    _assert_passes(_lint_imports())


def test_mypy_is_clean():
    _assert_passes(_mypy_result(timeout=600))


def test_an_upward_import_breaks_the_contract(tmp_path: Path):
    """The contract is live: a `core` module importing the training wing is reported, not passed."""
    ignore = shutil.ignore_patterns("__pycache__")
    for package in ("noesis_accel", "hydra_plugins"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "noesis_accel" / "core" / "upward.py").write_text("import noesis_accel.training.trainer\n")

    result = _lint_imports(tmp_path)

    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Wings import only downward BROKEN" in output, output
    assert "noesis_accel.core.upward -> noesis_accel.training.trainer" in output, output
