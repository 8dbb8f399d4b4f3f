"""How tokenized records become training micro-batches: ``pad``, ``group`` or ``pack``.

- ``pad``: random micro-batches of ``micro_batch_size`` records, right-padded to their
  longest row (Dolly's way). On Alpaca-like data much of what is computed is padding
  (benchmarks/RESULTS.md).
- ``group``: the same records per micro-batch, but each worker sorts each window of
  rows it reads (``--shuffle-buffer-rows``) by length before cutting it, so a
  micro-batch holds records of similar length; the micro-batches of a window are then
  shuffled. Same micro-batch count as ``pad``.
- ``pack``: records are packed whole (never split) into rows of at most ``max_length``
  tokens; a micro-batch is ``micro_batch_size`` such packed rows, so it holds up to
  ``micro_batch_size * max_length`` tokens: the same worst case as ``pad``, but nearly
  all of it real tokens. ``position_ids`` restart at 0 for each record, and
  transformers turns restarting positions (with no 2D attention mask and no cache) into
  a block-diagonal causal mask, so records in one row never see each other; each
  record's labels come from ``labels.record_labels``, whose first label is always
  ignored, so no token is predicted from the previous record.

Packing happens once, when the data is prepared (``prepared``), in windows of records,
so the number of packed rows, and therefore every worker's step count, is known before
training starts; packed rows are reshuffled on each worker every epoch.
"""

from __future__ import annotations

import bisect
import math
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from dolly_ray.train import labels

STRATEGIES = ("pad", "group", "pack")
# Key of the useful (non-padding) token count that collators add to each batch; it is
# metadata for throughput, taken out before the model sees the batch.
NUM_TOKENS = "num_tokens"
# Attention implementations that build their mask with transformers' create_causal_mask,
# which honours restarting position_ids (the packing test checks it). flash_attention_2
# takes record boundaries from elsewhere, which nothing here verifies, so packing refuses it.
PACKING_ATTENTION = ("eager", "sdpa", "flex_attention")


def check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown batching {strategy!r}; choose one of {list(STRATEGIES)}")


def check_packing_attention(model_config) -> None:
    """Refuse to pack for a model whose attention would let packed records see each other."""
    implementation = getattr(model_config, "_attn_implementation", None)
    if implementation not in PACKING_ATTENTION:
        raise ValueError(
            f"batching 'pack' needs an attention implementation that isolates packed records "
            f"({', '.join(PACKING_ATTENTION)}); the model uses {implementation!r}. Use --batching group instead."
        )


# --- packing (at preparation) --------------------------------------------------------


def pack_lengths(lengths: list[int] | np.ndarray, capacity: int, seed: int = 0) -> list[list[int]]:
    """Best fit in a seeded random order: indices of the records in each packed row of
    ``capacity`` tokens.

    Random order, not the tighter best-fit *decreasing*: sorting by length would put
    records of one length (often of one kind of task) in the same rows and micro-batches,
    which slows learning the way unshuffled data does; rows still come out nearly full.
    Deterministic for given lengths and seed (exact resume).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > capacity:
        raise ValueError(f"a record of {int(lengths.max())} tokens cannot be packed into rows of {capacity}")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    for index in np.random.default_rng(seed).permutation(len(lengths)):
        need = int(lengths[index])
        at = bisect.bisect_left(free, (need, -1))
        if at == len(free):
            rows.append([int(index)])
            bisect.insort(free, (capacity - need, len(rows) - 1))
        else:
            room, row = free.pop(at)
            rows[row].append(int(index))
            bisect.insort(free, (room - need, row))
    return rows


def pack(rows: pa.Table, max_length: int, seed: int = 0) -> pa.Table:
    """Records (``input_ids``, ``loss_mask``, ``num_tokens``) packed whole into rows of at
    most ``max_length`` tokens, each row with its records' ``lengths`` (see the module docstring)."""
    packed = pack_lengths(rows["num_tokens"].to_numpy(), max_length, seed)
    taken = rows.take(pa.array(np.concatenate(packed) if packed else [], pa.int64()))
    record_tokens = taken["num_tokens"].to_numpy()
    records_per_row = np.array([len(row) for row in packed], np.int64)
    row_tokens = np.add.reduceat(record_tokens, np.cumsum(records_per_row) - records_per_row) if packed else record_tokens
    token_offsets = list_offsets(row_tokens)
    return pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(token_offsets, pc.list_flatten(taken["input_ids"]).combine_chunks()),
            "loss_mask": pa.ListArray.from_arrays(token_offsets, pc.list_flatten(taken["loss_mask"]).combine_chunks()),
            "lengths": pa.ListArray.from_arrays(list_offsets(records_per_row), pa.array(record_tokens, pa.int32())),
            "num_tokens": pa.array(row_tokens, pa.int32()),
        }
    )


def list_offsets(sizes: np.ndarray) -> pa.Array:
    """Arrow list offsets for consecutive lists of ``sizes`` elements."""
    return pa.array(np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]), pa.int32())


def numpy_rows(table: pa.Table) -> dict[str, np.ndarray]:
    """Prepared rows as the collators take them: a numpy column each (lists as arrays of
    arrays), with the labels the loss mask stands for."""
    rows = {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names if name != "loss_mask"}
    ids = pc.list_flatten(table["input_ids"]).to_numpy()
    mask = pc.list_flatten(table["loss_mask"]).to_numpy(zero_copy_only=False)
    label_ids = pa.array(np.where(mask, ids, labels.IGNORE_INDEX).astype(np.int32))
    rows["labels"] = pa.ListArray.from_arrays(list_offsets(table["num_tokens"].to_numpy()), label_ids).to_numpy(zero_copy_only=False)
    return rows


# --- collating (worker side) --------------------------------------------------------


def _right_padded(batch: dict[str, np.ndarray], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """input_ids and labels of a micro-batch right-padded to its longest row (padding's
    labels are ignored, so it never counts in the loss), and that longest length."""
    rows = batch["input_ids"]
    longest = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    label_ids = labels.padding_labels(len(rows), longest)
    for i, (ids, row_labels) in enumerate(zip(rows, batch["labels"])):
        input_ids[i, : len(ids)] = torch.from_numpy(np.array(ids))  # a copy: Ray hands read-only arrays
        label_ids[i, : len(ids)] = torch.from_numpy(np.array(row_labels))
    return input_ids, label_ids, longest


class PaddedRecordsCollator:
    """Right-pads each micro-batch to its longest row (Dolly's way); the attention mask
    hides the padding from the real tokens."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        input_ids, label_ids, longest = _right_padded(batch, self.pad_token_id)
        attention_mask = (torch.arange(longest) < torch.tensor([len(row) for row in batch["input_ids"]])[:, None]).long()
        return {"input_ids": input_ids, "labels": label_ids, "attention_mask": attention_mask, NUM_TOKENS: attention_mask.sum()}


class PackedRowsCollator:
    """Packed rows -> model inputs: position_ids restart at every record, no attention mask.

    Rows are right-padded to the longest; the padding is one more "record" of its own
    (positions from 0, labels ignored), so no real token attends to it.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        input_ids, label_ids, longest = _right_padded(batch, self.pad_token_id)
        position_ids = torch.zeros_like(input_ids)
        for i, (ids, lengths) in enumerate(zip(batch["input_ids"], batch["lengths"])):
            segments = [*lengths, longest - len(ids)] if len(ids) < longest else lengths
            position_ids[i] = torch.cat([torch.arange(int(n)) for n in segments])
        return {"input_ids": input_ids, "labels": label_ids, "position_ids": position_ids, NUM_TOKENS: torch.tensor(int(batch["num_tokens"].sum()))}


def micro_batches(
    rows, strategy: str, *, micro_batch_size: int, pad_token_id: int, window_rows: int, seed: int | None = None, skip: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """One worker's micro-batches of one pass over its ``rows`` (``prepared.WorkerRows``),
    from micro-batch ``skip`` on.

    The rows are read in windows of ``window_rows`` (rounded up to whole micro-batches).
    With a ``seed`` (training) the windows come in a seeded random order and each
    window's rows are shuffled (``pad``, ``pack``) or length-grouped (``group``) by a
    generator seeded by the window, so a resumed pass seeks straight to its window. Without
    one (eval) they come in order. Every strategy gives ``ceil(rows / micro_batch_size)``
    micro-batches: the counts the driver plans with.
    """
    check_strategy(strategy)
    collate = PackedRowsCollator(pad_token_id) if strategy == "pack" else PaddedRecordsCollator(pad_token_id)
    window_rows = math.ceil(window_rows / micro_batch_size) * micro_batch_size
    starts = np.arange(0, rows.num_rows, window_rows)
    if seed is not None:
        starts = np.random.default_rng(seed).permutation(starts)
    for start in starts:
        size = min(window_rows, rows.num_rows - int(start))
        count = math.ceil(size / micro_batch_size)
        if skip >= count:
            skip -= count
            continue
        window = rows.read(int(start), int(start) + size)
        rng = np.random.default_rng([seed, int(start)]) if seed is not None else None
        if strategy == "group":
            groups = length_groups(window["num_tokens"], micro_batch_size, rng)
        else:
            order = rng.permutation(size) if rng is not None else np.arange(size)
            groups = [order[i : i + micro_batch_size] for i in range(0, size, micro_batch_size)]
        for group in groups[skip:]:
            yield collate({key: values[group] for key, values in window.items()})
        skip = 0


def length_groups(lengths, micro_batch_size: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """``group`` within one window: row indices of each micro-batch, cut from the rows
    sorted by length, in an order shuffled by ``rng`` (kept sorted without one)."""
    by_length = np.argsort(np.asarray(lengths), kind="stable")
    groups = [by_length[i : i + micro_batch_size] for i in range(0, len(by_length), micro_batch_size)]
    return [groups[i] for i in rng.permutation(len(groups))] if rng is not None else groups
