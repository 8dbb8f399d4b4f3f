"""Validated records -> Dolly text -> token ids, labels and split, and the report that counts them.

The records come from ``sources.read_records`` (every source, with exact rows and
skip reasons). Here they are formatted in the Dolly prompt, tokenized, given labels on
the response and ``### End`` only (``labels.record_labels``), and split into train and
eval by content. Bad records are never dropped silently: they keep their row until
the report has counted them, and in strict mode the first one stops the run with its
source, row and field. ``prepared`` runs this over a dataset with Ray Data and keeps the
result.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np
import pyarrow as pa

from dolly_ray import prompts
from dolly_ray.records.sources import SCHEMAS
from dolly_ray.train import labels

EVAL_TEXT_COLUMNS = ("instruction", "input", "output")


@dataclass
class DataConfig:
    """Where the records come from and how they become training rows."""

    source: str = "tatsu-lab/alpaca"
    columns: str = "alpaca"
    split: str = "train"  # the split to read from a Hugging Face dataset
    max_length: int = 1024
    eval_fraction: float = 0.02
    seed: int = 42
    strict: bool = False
    pack: bool = True  # records packed into max_length-token rows (batching "pack")


def in_eval_split(instruction: str, input: str, output: str, seed: int, eval_fraction: float) -> bool:
    """Decided by content and seed, so any order or parallelism gives the same split
    and duplicate records never straddle train and eval."""
    digest = hashlib.blake2b(f"{seed}\0{instruction}\0{input}\0{output}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < eval_fraction


class TokenizedRecord(NamedTuple):
    """One record's token ids and labels; both empty when it has more than ``max_length``
    tokens (``num_tokens`` then says how many)."""

    input_ids: list[int]
    labels: list[int]
    num_tokens: int

    @property
    def too_long(self) -> bool:
        return not self.input_ids


def tokenize_records(records: Sequence[dict], tokenizer, max_length: int) -> list[TokenizedRecord]:
    """Valid records (``instruction``/``input``/``output`` strings) as training rows, without Ray.

    ``tokenizer`` has the prompt keys (``prompts.load_tokenizer``). A record longer than
    ``max_length`` is skipped, never truncated: truncation could cut the response key
    and leave nothing to learn.
    """
    texts = [prompts.format_training_text(r["instruction"], r["output"], r["input"]) for r in records]
    encoded = tokenizer(texts)["input_ids"] if texts else []
    response_id = tokenizer.convert_tokens_to_ids(prompts.RESPONSE_KEY)
    return [
        TokenizedRecord([], [], len(ids)) if len(ids) > max_length else TokenizedRecord(ids, labels.record_labels(ids, response_id), len(ids))
        for ids in encoded
    ]


@functools.lru_cache(maxsize=4)
def _tokenizer(name_or_path: str, trust_remote_code: bool, files_stamp: float):
    """The tokenizer, loaded once per Ray worker process: Ray Data runs a pipeline's tasks
    on the same warm processes, so only the first batch on each pays for the load.
    ``files_stamp`` (the directory's newest change) makes a re-saved tokenizer load anew."""
    return prompts.load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)


def _files_stamp(path: str) -> float:
    return max((entry.stat().st_mtime for entry in os.scandir(path)), default=0.0) if os.path.isdir(path) else 0.0


def tokenize_batch(batch: pa.Table, *, tokenizer: str, max_length: int, seed: int, eval_fraction: float, trust_remote_code: bool = False) -> pa.Table:
    """map_batches function: validated records -> token ids, labels, length and split; held-out
    records keep their text too, for answering them during training (``Prepared.heldout``)."""
    records = batch.to_pylist()
    usable = [i for i, r in enumerate(records) if not r["skip_reason"]]
    loaded = _tokenizer(tokenizer, trust_remote_code, _files_stamp(tokenizer))
    tokenized = tokenize_records([records[i] for i in usable], loaded, max_length)
    input_ids: list[list[int]] = [[] for _ in records]
    label_ids: list[list[int]] = [[] for _ in records]
    is_eval = [False] * len(records)
    for i, row in zip(usable, tokenized):
        record = records[i]
        if row.too_long:
            record["skip_reason"] = "too_long"
            record["skip_detail"] = f"{row.num_tokens} tokens > max_length {max_length}"
            continue
        input_ids[i], label_ids[i] = row.input_ids, row.labels
        is_eval[i] = in_eval_split(record["instruction"], record["input"], record["output"], seed, eval_fraction)
    return pa.Table.from_pydict(
        {
            "source": batch["source"],
            "row": batch["row"],
            "skip_reason": pa.array([r["skip_reason"] for r in records], pa.string()),
            "skip_detail": pa.array([r["skip_detail"] for r in records], pa.string()),
            "input_ids": pa.array(input_ids, pa.list_(pa.int32())),
            "labels": pa.array(label_ids, pa.list_(pa.int32())),
            "num_tokens": pa.array([len(ids) for ids in input_ids], pa.int32()),
            "is_eval": pa.array(is_eval, pa.bool_()),
            **{key: pa.array([r[key] if e else None for r, e in zip(records, is_eval)], pa.string()) for key in EVAL_TEXT_COLUMNS},
        }
    )


@dataclass
class DataReport:
    """What one pass over the prepared records found: counts, skips and token lengths."""

    total: int = 0
    train_rows: int = 0
    eval_rows: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    first_skip: dict[str, str] = field(default_factory=dict)  # reason -> "source row N: detail"
    token_lengths: dict[str, float] = field(default_factory=dict)  # min, median, p95, max
    first_bad: str = ""  # "(reason) in source row N: detail" of the first skipped record: strict mode's error

    def add_window(self, window: dict, lengths: dict[int, int]) -> None:
        """Count one prepared window (``prepared.prepare_window``'s account); its usable
        records' token lengths go into ``lengths``."""
        self.total += window["records"]
        self.train_rows += window["train_records"]
        self.eval_rows += window["eval_records"]
        for reason, count, where in json.loads(window["skips"]):
            self.skipped[reason] = self.skipped.get(reason, 0) + count
            self.first_skip.setdefault(reason, where)
            self.first_bad = self.first_bad or f"({reason}) in {where}"
        for value, count in zip(window["length_values"], window["length_counts"]):
            lengths[value] = lengths.get(value, 0) + count

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        skips = ", ".join(f"{reason}={count}" for reason, count in sorted(self.skipped.items())) or "none"
        lengths = ", ".join(f"{k}={v:g}" for k, v in self.token_lengths.items())
        return (
            f"{self.total} records: {self.train_rows} train, {self.eval_rows} eval, "
            f"{self.num_skipped} skipped ({skips}); tokens per record: {lengths}"
        )


def window_skips(tokenized: pa.Table) -> list[list]:
    """A window's skipped records as ``[reason, count, "source row N: detail" of the
    first]``, reasons in the order they first occur."""
    skips: dict[str, list] = {}
    columns = [tokenized[name].to_pylist() for name in ("skip_reason", "source", "row", "skip_detail")]
    for reason, source, row, detail in zip(*columns):
        if reason:
            skips.setdefault(reason, [reason, 0, f"{source} row {row}: {detail}"])[1] += 1
    return list(skips.values())


def length_stats(counts: dict[int, int]) -> dict[str, float]:
    """min, median, p95 and max of token lengths given as {length: records}."""
    if not counts:
        return {}
    values = np.array(sorted(counts))
    cumulative = np.cumsum([counts[v] for v in values])

    def quantile(q: float) -> float:
        return float(values[np.searchsorted(cumulative, q * (cumulative[-1] - 1), side="right")])

    return {"min": float(values[0]), "median": quantile(0.5), "p95": quantile(0.95), "max": float(values[-1])}


def schema_hint(report: DataReport) -> str:
    if any(reason.startswith("missing_") for reason in report.skipped):
        return f"; check the column mapping (schemas: {sorted(SCHEMAS)} or instruction=A,input=B,output=C)"
    return ""
