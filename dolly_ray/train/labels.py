"""What the loss is taken over: each record's response and ``### End``, nothing else.

Labels hold the token a position must predict, or ``IGNORE_INDEX`` where there is
none to learn: the prompt (up to and including ``### Response:``) and padding. Every
stage that builds, pads or counts labels goes through here.
"""

from __future__ import annotations

from typing import Sequence

import torch

IGNORE_INDEX = -100  # what transformers' and torch's cross-entropy skip


def record_labels(input_ids: Sequence[int], response_id: int) -> list[int]:
    """One record's labels: ignored up to and including the response key, then its own ids.

    The first label is therefore always ignored, so in a packed row no token is ever
    predicted from the record before it.
    """
    response_at = list(input_ids).index(response_id)
    return [IGNORE_INDEX] * (response_at + 1) + [int(i) for i in input_ids[response_at + 1 :]]


def padding_labels(rows: int, length: int) -> torch.Tensor:
    """Labels of an all-padding micro-batch, to be filled with the rows' own labels."""
    return torch.full((rows, length), IGNORE_INDEX, dtype=torch.long)


def label_tokens(labels: torch.Tensor) -> int:
    """Tokens the loss is taken over: labels after the causal shift that are not ignored."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def loss_divisor(step_label_tokens: float, world_size: int, micro_batches: int) -> float:
    """The ``num_items_in_batch`` to hand the model for each micro-batch of one step.

    Every label token of the optimizer step, on every worker, should weigh the same
    whatever the batching: the summed token losses are divided by the step's label
    tokens on all workers. DeepSpeed divides by the accumulation steps and averages
    gradients over workers, so the divisor is scaled back by both.
    """
    return max(step_label_tokens, 1.0) / (world_size * micro_batches)
