"""What the Modal image carries: the project's dependencies less `modal`, the extras the config needs,
and the files the code reads besides its Python sources.

`launch/modal_entry.py` builds the image from these. The container reads pyproject.toml again (the
image carries it to /root, beside conf/ and the package), so a check of `modal.extras` gives the
same answer on the laptop and in the container.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from noesis_accel.config import CONF_DIR
from noesis_accel.core.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover (the project's image and CI run 3.11)
    import tomli as tomllib

# conf/ sits beside the package, in a checkout and in the container alike (/root/conf, /root/noesis_accel).
PYPROJECT = CONF_DIR.parent / "pyproject.toml"
# Modal's runtime brings its own client into every container, in the version that started the app;
# a second copy from PyPI could shadow it with another version.
RUNTIME_PROVIDED = ("modal",)
# Packages the image carries as /root/<name>, their data files included, beside conf/ (/root/conf).
# Our Hydra plugin by its own name: `hydra_plugins` is a namespace package that every installed Hydra
# plugin shares, so naming it would upload theirs too, without the dependencies they import.
IMAGE_PACKAGES = ("noesis_accel", "hydra_plugins.noesis_modal_launcher")
# What `add_local_python_source` must still leave out once it uploads more than .py files (its
# default skips these too): bytecode, caches, dot-files. A list: Modal turns only a list into patterns.
NOT_SHIPPED = ["**/__pycache__", "**/*.pyc", "**/.*"]
# Extras a config key asks for: Liger's Triton kernels come with the `gpu` extra.
EXTRAS_FOR_KEYS = {"model.liger": "gpu"}
# Extras a `train.tracker` asks for; TensorBoard is a dependency of the project itself.
EXTRAS_FOR_TRACKERS = {"wandb": "wandb", "mlflow": "mlflow"}
TRACKERS_IN_IMAGE = ("tensorboard", "none", *EXTRAS_FOR_TRACKERS)
# System packages an extra builds with: llama-cpp-python compiles llama.cpp, and debian_slim has no compiler.
APT_FOR_EXTRAS = {"gguf": ("build-essential", "cmake")}


def apt_packages(extras: Sequence[str]) -> list[str]:
    """The system packages the image must install before pip builds `extras`."""
    return list(dict.fromkeys(package for extra in extras for package in APT_FOR_EXTRAS.get(extra, ())))


def carried_by_image(path: Path) -> bool:
    """A local file the image carries: under the project's conf/ or one of its packages."""
    resolved = path.expanduser().resolve()
    roots = [CONF_DIR, *(CONF_DIR.parent.joinpath(*package.split(".")) for package in IMAGE_PACKAGES)]
    return any(resolved.is_relative_to(root.resolve()) for root in roots)


def _project_table(pyproject: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(pyproject.read_text())["project"]
    except FileNotFoundError:
        raise ConfigError(
            f"modal.extras: {pyproject} is missing; the Modal entry reads the project's dependencies "
            "from it (run from a checkout of the project)"
        ) from None


def known_extras(pyproject: Path = PYPROJECT) -> tuple[str, ...]:
    """The optional dependency groups pyproject.toml declares (`pip install 'noesis-accel[NAME]'`)."""
    return tuple(sorted(_project_table(pyproject).get("optional-dependencies", {})))


def _requirement_name(requirement: str) -> str:
    """`Modal>=1.0; python_version<'3.12'` -> `modal` (a PEP 508 name, normalised as pip compares names)."""
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    return re.sub(r"[-_.]+", "-", name.group(1)).lower() if name else requirement


def image_requirements(extras: Sequence[str], pyproject: Path = PYPROJECT) -> list[str]:
    """The project's dependencies and those of `extras`, less what Modal's runtime brings itself."""
    project = _project_table(pyproject)
    groups = project.get("optional-dependencies", {})
    wanted = [*project.get("dependencies", []), *(req for extra in extras for req in groups.get(extra, []))]
    return [req for req in wanted if _requirement_name(req) not in RUNTIME_PROVIDED]


def config_extras(cfg: DictConfig) -> tuple[str, ...]:
    """`modal.extras`, plus the groups that config keys need (`model.liger=true` -> `gpu`,
    `train.tracker=wandb` -> `wandb`)."""
    from omegaconf import OmegaConf

    extras = list(cfg.modal.extras)
    wanted = [extra for key, extra in EXTRAS_FOR_KEYS.items() if OmegaConf.select(cfg, key)]
    wanted += [EXTRAS_FOR_TRACKERS[cfg.train.tracker]] if cfg.train.tracker in EXTRAS_FOR_TRACKERS else []
    extras += [extra for extra in wanted if extra not in extras]
    return tuple(extras)


def tracker_problem(cfg: DictConfig) -> str | None:
    """Why the image would lack `train.tracker`'s package (one no extra of this project installs), or None."""
    if cfg.train.tracker in TRACKERS_IN_IMAGE:
        return None
    return (
        f"train.tracker={cfg.train.tracker}: the Modal image installs no package for it; on Modal use "
        f"{', '.join(t for t in TRACKERS_IN_IMAGE if t != 'none')} or none"
    )


def extras_problem(cfg: DictConfig, pyproject: Path = PYPROJECT) -> str | None:
    """Why `modal.extras` names a group pyproject.toml does not declare (a misspelling), or None."""
    known = known_extras(pyproject)
    unknown = [str(extra) for extra in cfg.modal.extras if extra not in known]
    if not unknown:
        return None
    return (
        f"modal.extras: {', '.join(repr(e) for e in unknown)} is not an optional dependency group of this "
        f"project; known extras: {', '.join(known)}"
    )
