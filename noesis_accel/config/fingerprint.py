"""What a restart may change: the config's math keys, their fingerprint and the keys that differ."""

from __future__ import annotations

import hashlib
import json
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

# Keys that may change between a run and its restart because they do not change the math.
RESTART_SAFE_PREFIXES = (
    "run.",
    "ckpt.",  # cadence, retention, resume choice, commits, lease: where and when, never what
    "train.log_every",
    "train.tracker",
    "train.progress_bar",
    "train.print_every",
    "train.eval_every",
    "data.num_workers",
    "data.num_proc",
    "data.cache_dir",
    "data.persistent_cache_dir",
    # The shape the data group's own file has: other data is read as what it is either way (a restart
    # reads the same file the same way), so a group that learns to declare it does not stop a resume.
    "data.group_format",
    "model.cache_dir",
    "env.",
    "modal.",
    # The process layout may change (8 -> 16 GPUs); the global batch, which is the math, may not.
    "distributed.",
    # Evaluation runs after training and never changes the weights.
    "eval.",
    "tracker.",  # where the metrics are sent, never what is trained
    "budget.",  # what a run may spend: a restart with a higher cap continues the same math
    "plan.",  # how estimates are made
)


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, Any]:
    container = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True)) if isinstance(cfg, DictConfig) else cfg
    flat: dict[str, Any] = {}
    for key, value in container.items():
        path = prefix + str(key)
        if isinstance(value, dict):
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


# Keys added after runs were started: at these defaults they are left out of the math keys, so a run
# (and its checkpoints' fingerprint) from before they existed still resumes.
ADDED_KEY_DEFAULTS: dict[str, Any] = {
    "data.packing": False,
    "model.liger": False,
    "model.compile": False,
    "data.on_too_long": "truncate",
    "data.eval_split": None,
    "data.train_on": "assistant",
    "data.chat_template": None,
    "data.role_key": None,
    "data.content_key": None,
    "data.on_bad_record": "error",
}


def math_keys(cfg: DictConfig | dict) -> dict[str, Any]:
    """The flattened config without the keys a restart may change."""
    return {
        k: v
        for k, v in flatten(cfg).items()
        if not k.startswith(RESTART_SAFE_PREFIXES) and not (k in ADDED_KEY_DEFAULTS and v == ADDED_KEY_DEFAULTS[k])
    }


def fingerprint(cfg: DictConfig | dict) -> str:
    """A short hash of everything that changes the math; stored in every checkpoint manifest."""
    blob = json.dumps(math_keys(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def differing_math_keys(saved: dict, current: DictConfig | dict) -> list[str]:
    """Keys whose values differ between a saved config and the current one, restart-safe keys aside."""
    old, new = math_keys(saved), math_keys(current)
    return sorted(k for k in old.keys() | new.keys() if old.get(k, "<absent>") != new.get(k, "<absent>"))
