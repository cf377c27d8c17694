"""The allocator variable is the one the installed torch reads, and never both."""

from __future__ import annotations

import pytest

from noesis_accel.core import env


@pytest.mark.parametrize(
    "version,variable",
    [
        ("2.9.1", "PYTORCH_CUDA_ALLOC_CONF"),
        ("2.10.0", "PYTORCH_ALLOC_CONF"),
        ("2.13.0+cpu", "PYTORCH_ALLOC_CONF"),
        ("2.10.0a0+git", "PYTORCH_ALLOC_CONF"),
    ],
)
def test_alloc_conf_variable_by_torch_version(monkeypatch, version: str, variable: str) -> None:
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert env.apply_alloc_conf("expandable_segments:True", version) == variable
    import os

    other = "PYTORCH_CUDA_ALLOC_CONF" if variable == "PYTORCH_ALLOC_CONF" else "PYTORCH_ALLOC_CONF"
    assert os.environ[variable] == "expandable_segments:True"
    assert other not in os.environ


def test_user_exported_value_wins_and_moves_to_the_right_variable(monkeypatch) -> None:
    import os

    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    env.apply_alloc_conf("expandable_segments:True", "2.13.0")
    assert os.environ["PYTORCH_ALLOC_CONF"] == "max_split_size_mb:128"
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ


def test_no_alloc_conf_sets_nothing(monkeypatch) -> None:
    import os

    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    assert env.apply_alloc_conf(None, "2.13.0") is None
    assert "PYTORCH_ALLOC_CONF" not in os.environ
