"""The keys the schema declares, and the declared key nearest to one that is not.

One owner for "is this a key, and if not what did they mean": `validate` (keys that reached the
composed config), the command-line check in front of Hydra (`overrides.py`) and `noesis train --help`
all read it, so a typo gets the same answer wherever it is caught.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import is_dataclass

from omegaconf import DictConfig, OmegaConf

# Names people bring from Hugging Face's TrainingArguments and TRL, and where that setting lives here.
KNOWN_ELSEWHERE = {
    "learning_rate": "optim.lr",
    "lr": "optim.lr",
    "num_train_epochs": "train.epochs",
    "num_epochs": "train.epochs",
    "per_device_train_batch_size": "train.micro_batch_size",
    "batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size (accumulation is derived)",
    "max_seq_length": "data.max_length",
    "max_seq_len": "data.max_length",
    "lora_r": "peft.r",
    "lora_alpha": "peft.alpha",
    "lora_dropout": "peft.dropout",
    "save_steps": "ckpt.every",
    "logging_steps": "train.log_every",
    "bf16": "train.mixed_precision",
    "report_to": "train.tracker",
    "output_dir": "run.root",
}


@functools.lru_cache(maxsize=4)
def declared_keys(schema_type: type) -> dict[str, bool]:
    """Every key `schema_type` declares, dotted, each with whether its value is free-form (a map or Any).

    Below a free-form key any name is the user's own (`model.architecture.num_hidden_layers`).
    """
    return _declared(OmegaConf.structured(schema_type))


def _declared(schema: DictConfig, prefix: str = "") -> dict[str, bool]:
    declared: dict[str, bool] = {}
    for key in schema:
        node = schema._get_node(key)
        dotted = prefix + str(key)
        structured = isinstance(node, DictConfig) and is_dataclass(OmegaConf.get_type(node))
        declared[dotted] = isinstance(node, DictConfig) and not structured or _is_any(schema, str(key))
        if structured and isinstance(node, DictConfig):
            declared.update(_declared(node, f"{dotted}."))
    return declared


def _is_any(parent: DictConfig, key: str) -> bool:
    """A leaf typed Any (`modal.gpu`, `eval.judge`): it may hold a map, whose keys are the user's."""
    from omegaconf import AnyNode

    return isinstance(parent._get_node(key), AnyNode)


def is_declared(key: str, schema_type: type) -> bool:
    """`key` is declared, or lies below a free-form key."""
    declared = declared_keys(schema_type)
    if key in declared:
        return True
    parts = key.split(".")
    return any(declared.get(".".join(parts[:n])) for n in range(1, len(parts)))


def nearest_key(key: str, schema_type: type) -> str | None:
    """The declared key a typo most likely meant, or where a Hugging Face / TRL name lives here."""
    declared = list(declared_keys(schema_type))
    elsewhere = {name: where for name, where in KNOWN_ELSEWHERE.items() if where.split(" ")[0] in declared}
    leaf = key.rsplit(".", 1)[-1]
    if leaf in elsewhere:
        return elsewhere[leaf]
    near = difflib.get_close_matches(key, declared, n=1, cutoff=0.75)
    if near and near[0] != key:
        return near[0]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in declared if "." in k}
    near = difflib.get_close_matches(leaf, list(by_leaf) + list(elsewhere), n=1, cutoff=0.6)
    return (by_leaf.get(near[0]) or elsewhere[near[0]]) if near else None


def unknown_key_line(key: str, schema_type: type, command: str = "noesis train") -> str:
    """The one line for a key the schema does not declare."""
    near = nearest_key(key, schema_type)
    section = key.split(".", 1)[0]
    if command == "noesis train":
        listing = f"{command} --help {section}" if section in declared_keys(schema_type) else f"{command} --help"
    else:  # the other commands' configs: conf/<name>.yaml names its keys, the schema documents them
        listing = f"{command} --help"
    hint = f"did you mean {near}?" if near else f"no key of that name exists for {command}"
    return f"{key}: not a key of the config; {hint} ({listing} lists the keys)"
