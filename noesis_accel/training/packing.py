"""Padding-free micro-batches (`data.packing=true`): a micro-batch's records laid end to end in one row.

The sampler still chooses which records form each micro-batch; packing changes only their layout.
Positions restart at 0 for every record, and transformers reads those restarts (when no
`attention_mask` is given) as document boundaries: eager and sdpa attention get a block-diagonal
causal mask (`masking_utils.find_packed_sequence_indices`), flash_attention_2 its variable-length
kernel (`modeling_flash_attention_utils._is_packed_sequence`, which needs exactly one row). So no
token attends to, or is predicted from, another record.
"""

from __future__ import annotations

import torch

from noesis_accel.config import DataConfig
from noesis_accel.training.data import IGNORE_INDEX, PaddingCollator


class PackingCollator:
    """One row per micro-batch: `input_ids`, `labels` and `position_ids`, no padding, no attention mask.

    The label of each record's first token is ignored, so the last token of one record never learns
    to predict the next record. That label never counted in a padded batch either (the first
    position of a row is never predicted; see `data.label_count`), so the summed token loss, and
    with it the token-weighted loss of the global batch, is the padded batch's.

    `pad_to_multiple_of` does not apply: a packed row has no padding to round up.
    """

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        input_ids = torch.cat([torch.as_tensor(row["input_ids"], dtype=torch.long) for row in rows])
        labels = torch.cat([torch.as_tensor(row["labels"], dtype=torch.long) for row in rows])
        lengths = [len(row["input_ids"]) for row in rows]
        starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
        labels[starts] = IGNORE_INDEX
        position_ids = torch.cat([torch.arange(n, dtype=torch.long) for n in lengths])
        return {"input_ids": input_ids[None], "labels": labels[None], "position_ids": position_ids[None]}


def build_collator(data_cfg: DataConfig, pad_token_id: int) -> PaddingCollator | PackingCollator:
    """The collator `data.packing` asks for; the held-out loss uses the same one."""
    if data_cfg.packing:
        return PackingCollator()
    return PaddingCollator(pad_token_id, data_cfg.pad_to_multiple_of)


def records_and_tokens(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Records and non-pad tokens in a collated micro-batch, read on the host before it is moved."""
    if "attention_mask" in batch:  # padded: one row per record
        return batch["input_ids"].shape[0], int(batch["attention_mask"].sum())
    return int((batch["position_ids"] == 0).sum()), batch["input_ids"].numel()
