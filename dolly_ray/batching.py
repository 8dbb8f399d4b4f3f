"""Turning tokenized records into model batches on a training worker."""

from __future__ import annotations

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

IGNORE_INDEX = -100


class PadCollator(NumpyBatchCollateFn):
    """Right-pads each micro-batch to its longest row (Dolly's way).

    Labels are padded with -100 so padding never counts in the loss; the attention
    mask hides it from the real tokens.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        rows = batch["input_ids"]
        longest = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, (ids, row_labels) in enumerate(zip(rows, batch["labels"])):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(ids)] = torch.tensor(row_labels)
            attention_mask[i, : len(ids)] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
