"""`hydra/launcher=modal` against Hydra's own launcher test suite, with jobs run as local processes.

The local backend sends each job the same `JobRequest` strings a Modal call gets, and the job runs in
a fresh process through Hydra's `run_job`; only the transport differs from Modal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hydra.test_utils.launcher_common_tests import (
    BatchedSweeperTestSuite,
    IntegrationTestSuite,
    LauncherTestSuite,
)
from sweep_tasks import return_100


@pytest.fixture(autouse=True)
def unspecified_version_base():
    """Hydra's suite expects a fresh process, where no `version_base` has been chosen yet (jobs then
    chdir into their output dir); compositions by earlier tests in this process leave one behind."""
    from hydra import version

    instance = version.VersionBase.instance()
    before = instance.version_base
    instance.version_base = version._UNSPECIFIED_
    yield
    instance.version_base = before


@pytest.mark.parametrize("launcher_name, overrides", [("modal", ["hydra.launcher.backend=local"])])
class TestModalLauncher(LauncherTestSuite):
    def get_task_function(self) -> Callable[[Any], Any]:
        return return_100


@pytest.mark.parametrize(
    "launcher_name, overrides", [("modal", ["hydra.launcher.backend=local", "hydra.sweeper.max_batch_size=2"])]
)
class TestModalLauncherInBatches(BatchedSweeperTestSuite):
    pass


@pytest.mark.parametrize(
    "task_launcher_cfg, extra_flags", [({}, ["-m", "hydra/launcher=modal", "hydra.launcher.backend=local"])]
)
class TestModalLauncherIntegration(IntegrationTestSuite):
    pass
