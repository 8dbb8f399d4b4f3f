"""How tokenized records become training micro-batches: ``pad``, ``group`` or ``pack``.

- ``pad``: random micro-batches of ``micro_batch_size`` records, right-padded to their
  longest row (Dolly's way). On Alpaca-like data much of what is computed is padding
  (benchmarks/RESULTS.md).
- ``group``: the same records per micro-batch, but each worker sorts windows of
  ``GROUP_WINDOW_BATCHES`` micro-batches by length before cutting them, so a
  micro-batch holds records of similar length; the micro-batches of a window are then
  shuffled. Same micro-batch count as ``pad``.
- ``pack``: on the driver, before the data is split between workers, records are packed
  whole (never split) into rows of at most ``max_length`` tokens; a micro-batch is
  ``micro_batch_size`` such packed rows, so it holds up to ``micro_batch_size *
  max_length`` tokens: the same worst case as ``pad``, but nearly all of it real tokens.
  ``position_ids`` restart at 0 for each record, and transformers turns restarting
  positions (with no 2D attention mask and no cache) into a block-diagonal causal mask,
  so records in one row never see each other; each record's labels come from
  ``labels.record_labels``, whose first label is always ignored, so no token is
  predicted from the previous record.

Packing is done once on the driver so the number of packed rows, and therefore every
worker's step count, is known before training starts; packed rows are reshuffled on
each worker every epoch.
"""

from __future__ import annotations

import bisect
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch

from dolly_ray.train import labels

STRATEGIES = ("pad", "group", "pack")
# Micro-batches per length-sorted window in ``group``: large enough for similar lengths,
# small enough that an epoch's order stays random.
GROUP_WINDOW_BATCHES = 64
# Records packed together on the driver: the more at once, the fuller best fit leaves
# the rows (benchmarks/RESULTS.md has the fill on Alpaca-like data).
PACK_WINDOW_ROWS = 8192
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


# --- packing (driver side) ----------------------------------------------------------


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


def pack_batch(batch: dict[str, np.ndarray], *, max_length: int, response_id: int, seed: int = 0) -> pa.Table:
    """map_batches function: tokenized records -> packed rows (see the module docstring)."""
    input_ids, row_labels, lengths = [], [], []
    for row in pack_lengths(batch["num_tokens"], max_length, seed):
        input_ids.append(np.concatenate([batch["input_ids"][i] for i in row]))
        row_labels.append([label for i in row for label in labels.record_labels(batch["input_ids"][i], response_id)])
        lengths.append([int(batch["num_tokens"][i]) for i in row])
    return pa.Table.from_pydict(
        {
            "input_ids": pa.array(input_ids, pa.list_(pa.int32())),
            "labels": pa.array(row_labels, pa.list_(pa.int32())),
            "lengths": pa.array(lengths, pa.list_(pa.int32())),
            "num_tokens": pa.array([sum(x) for x in lengths], pa.int32()),
        }
    )


def prepare(dataset, strategy: str, max_length: int, response_id: int, seed: int = 0):
    """The driver-side transform of tokenized records for ``strategy`` (packing for ``pack``).

    Row counts of the result are what the step plan divides between workers.
    """
    check_strategy(strategy)
    if strategy != "pack":
        return dataset
    options = {"max_length": max_length, "response_id": response_id, "seed": seed}
    return dataset.map_batches(pack_batch, fn_kwargs=options, batch_size=PACK_WINDOW_ROWS, batch_format="numpy")


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
    shard, strategy: str, *, micro_batch_size: int, pad_token_id: int, shuffle_rows: int | None = None, seed: int | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """One worker's micro-batches of one pass over its shard (shuffled when ``seed`` is given).

    ``pad`` and ``group`` give ``ceil(rows / micro_batch_size)`` micro-batches, ``pack``
    the same over packed rows: the counts the driver plans with.
    """
    check_strategy(strategy)
    shuffle = {"local_shuffle_buffer_size": shuffle_rows, "local_shuffle_seed": seed} if seed is not None else {}
    if strategy != "group":
        collate = PackedRowsCollator(pad_token_id) if strategy == "pack" else PaddedRecordsCollator(pad_token_id)
        yield from shard.iter_torch_batches(batch_size=micro_batch_size, collate_fn=_numpy_collate_fn(collate), **shuffle)
        return
    collate = PaddedRecordsCollator(pad_token_id)
    rng = np.random.default_rng(seed) if seed is not None else None
    window_rows = micro_batch_size * GROUP_WINDOW_BATCHES
    for window in shard.iter_batches(batch_size=window_rows, batch_format="numpy", **shuffle):
        for rows in length_groups(window["num_tokens"], micro_batch_size, rng):
            yield collate({key: window[key][rows] for key in ("input_ids", "labels")})


def _numpy_collate_fn(collate):
    """``collate`` as the Ray Data collate function it is, one that takes numpy batches
    (Ray is imported only here, where the data comes from Ray)."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class Collate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
            return collate(batch)

    return Collate()


def length_groups(lengths, micro_batch_size: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """``group`` within one window: row indices of each micro-batch, cut from the rows
    sorted by length, in an order shuffled by ``rng`` (kept sorted without one)."""
    by_length = np.argsort(np.asarray(lengths), kind="stable")
    groups = [by_length[i : i + micro_batch_size] for i in range(0, len(by_length), micro_batch_size)]
    return [groups[i] for i in rng.permutation(len(groups))] if rng is not None else groups
