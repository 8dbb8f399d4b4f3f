"""Training input prepared once: records tokenized, split and batched into Parquet parts
that every run of the same data and settings reuses and that each worker streams.

Under ``<storage_path>/dolly_ray_prepared/<key>/``:

- ``parts/``: for each window of ``WINDOW_RECORDS`` records, its training rows, eval
  rows and held-out texts, written by the Ray Data task that prepared the window;
- ``manifest.json``, written last: the settings the key stands for, every part in
  order with its rows and tokens, and the validation report. A folder without one is
  an interrupted preparation, prepared anew.

The key is a hash of everything the rows depend on (``settings``): the dataset's content
fingerprint, columns and split, the tokenizer, the prompt format, max length, eval
fraction, seed and whether records are packed. Memory stays bounded whatever the
dataset's size: Ray Data streams windows from the source through the tokenizer to
storage, the driver keeps only each window's counts, and a worker reads only its own
row range, a window at a time (``WorkerRows``).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import hashlib
import json
import logging
import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dolly_ray import prompts, storage
from dolly_ray.records.sources import DataError, iterate, read_records
from dolly_ray.train import batching, data
from dolly_ray.train.labels import IGNORE_INDEX

logger = logging.getLogger(__name__)

PREPARED_DIR = "dolly_ray_prepared"  # in --storage-path, beside the runs
MANIFEST_FILE = "manifest.json"
PARTS_DIR = "parts"
# Bumped whenever what a part holds changes, so older preparations are never read as new.
FORMAT_VERSION = 1
# Records prepared (and packed together) per Ray Data task: the more at once, the fuller
# best-fit packing leaves the rows (benchmarks/RESULTS.md has the fill on Alpaca-like data).
WINDOW_RECORDS = 8192
# Rows per Parquet row group: a worker reads whole row groups, so small ones keep its
# reads close to the rows it needs.
ROW_GROUP_ROWS = 1024
# Seconds between two progress lines while a preparation runs.
PROGRESS_INTERVAL_S = 30.0
SPLITS = ("train", "eval", "heldout")


@dataclasses.dataclass(frozen=True)
class Part:
    """One Parquet file of a split: its path under the preparation, rows and tokens."""

    path: str
    rows: int
    tokens: int


@dataclasses.dataclass
class Prepared:
    """A finished preparation: where it is, what it holds, and whether this run made it."""

    location: str
    key: str
    parts: dict[str, list[Part]]  # by split, in order
    report: data.DataReport
    reused: bool
    seconds: float  # spent preparing, or reading the manifest when reused

    def rows(self, split: str) -> int:
        return sum(part.rows for part in self.parts[split])

    def tokens(self, split: str) -> int:
        return sum(part.tokens for part in self.parts[split])

    def heldout(self, n: int) -> list[dict]:
        """The first ``n`` held-out records as text (instruction, input, output) in the
        source's order: the same ones on every run of the same data and seed."""
        if not n:
            return []
        reader = PartsReader(self.location, self.parts["heldout"])
        return reader.read(0, min(n, reader.num_rows), list(data.EVAL_TEXT_COLUMNS)).to_pylist()

    def for_workers(self) -> dict[str, Any]:
        """What a training worker needs to read its rows (``WorkerRows``): small and picklable."""
        return {"location": self.location, **{split: [dataclasses.astuple(p) for p in self.parts[split]] for split in ("train", "eval")}}

    def summary(self) -> dict[str, Any]:
        return {"location": self.location, "key": self.key, "reused": self.reused, "seconds": round(self.seconds, 1)}


def settings(config: data.DataConfig, tokenizer, dataset_fingerprint: str) -> dict[str, Any]:
    """What the prepared rows depend on, and so what their key is made of."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return {
        "format_version": FORMAT_VERSION,
        "dataset": config.source,
        "dataset_fingerprint": dataset_fingerprint,
        "columns": config.columns,
        "split": config.split,
        "tokenizer": hashlib.sha256(f"{type(tokenizer).__name__}\0{vocabulary}".encode()).hexdigest()[:16],
        "prompt_format": hashlib.sha256(
            (prompts.format_training_text("{i}", "{o}", "{x}") + prompts.format_training_text("{i}", "{o}")).encode()
        ).hexdigest()[:16],
        "max_length": config.max_length,
        "eval_fraction": config.eval_fraction,
        "seed": config.seed,
        "packed": config.pack,
    }


def prepare(
    config: data.DataConfig, tokenizer_name: str, storage_path: str, *, trust_remote_code: bool = False, records=None, dataset_fingerprint: str | None = None
) -> Prepared:
    """The prepared rows for ``config``: reused when ``storage_path`` already holds them,
    made (and kept) otherwise. The validation report is logged either way, and strict
    mode's first bad record, or no usable record at all, raises DataError.

    ``records``: a Ray Dataset in the record schema, instead of reading ``config.source``.
    ``dataset_fingerprint``: ``storage.fingerprint(config.source)`` when the caller has it
    already (hashing a large local file twice would double its cost at start).
    """
    if records is None and storage.missing_local(config.source):
        raise DataError(f"cannot read {config.source}: no such file or directory")
    tokenizer = prompts.load_tokenizer(tokenizer_name, trust_remote_code=trust_remote_code)
    wanted = settings(config, tokenizer, dataset_fingerprint or storage.fingerprint(config.source))
    key = hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:16]
    location = storage.join(storage_path, PREPARED_DIR, key)
    start = time.perf_counter()
    manifest_path = storage.join(location, MANIFEST_FILE)
    if storage.is_file(manifest_path):
        prepared = _from_manifest(json.loads(storage.read_text(manifest_path)), location, key, time.perf_counter() - start)
        logger.info("data: reusing the rows prepared in %s (key %s)", location, key)
    else:
        prepared = _build(config, tokenizer_name, trust_remote_code, wanted, location, key, records)
        logger.info("data: prepared in %.1f s into %s (key %s)", prepared.seconds, location, key)
    _check(prepared.report, config)
    return prepared


def _from_manifest(manifest: dict, location: str, key: str, seconds: float) -> Prepared:
    parts = {split: [Part(*part) for part in manifest["parts"][split]] for split in SPLITS}
    return Prepared(location, key, parts, data.DataReport(**manifest["report"]), reused=True, seconds=seconds)


def _check(report: data.DataReport, config: data.DataConfig) -> None:
    """Log the report; refuse data that strict mode, or training at all, cannot take."""
    logger.info("data %s: %s", config.source, report.summary())
    for reason, where in sorted(report.first_skip.items()):
        logger.info("first %s skip: %s", reason, where)
    if config.strict and report.first_bad:
        raise DataError(f"invalid record {report.first_bad}")
    if report.train_rows == 0:
        raise DataError(f"no usable training records in {config.source}: {report.summary()}" + data.schema_hint(report))


def _build(config, tokenizer_name, trust_remote_code, wanted, location, key, records) -> Prepared:
    """Run the preparation with Ray Data and write its manifest last."""
    import ray.data

    storage.delete_dir(location)  # an interrupted preparation's parts
    # Windows, and so parts, in the source's order: the manifest lists them as they come.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    if records is None:
        records = read_records(config.source, config.columns, config.split)
    options = {
        "parts_dir": storage.join(location, PARTS_DIR),
        "tokenizer": tokenizer_name,
        "trust_remote_code": trust_remote_code,
        "max_length": config.max_length,
        "eval_fraction": config.eval_fraction,
        "seed": config.seed,
        "pack": config.pack,
    }
    windows = records.map_batches(prepare_window, fn_kwargs=options, batch_size=WINDOW_RECORDS, batch_format="pyarrow")
    start = time.perf_counter()
    report, parts = data.DataReport(), {split: [] for split in SPLITS}
    lengths: dict[int, int] = {}
    shown = start
    # closing: a strict-mode raise mid-way must stop the pipeline and free its actors now.
    with contextlib.closing(iterate(windows, batch_size=1, batch_format="pyarrow")) as batches:
        for batch in batches:
            window = batch.to_pylist()[0]
            report.add_window(window, lengths)
            if config.strict and report.first_bad:
                raise DataError(f"invalid record {report.first_bad}")
            for split in SPLITS:
                if window[f"{split}_rows"]:
                    parts[split].append(Part(window[f"{split}_part"], window[f"{split}_rows"], window[f"{split}_tokens"]))
            if time.perf_counter() - shown >= PROGRESS_INTERVAL_S:
                shown = time.perf_counter()
                logger.info("data: %s records prepared (%s records/s)", f"{report.total:,}", f"{report.total / (shown - start):,.0f}")
    report.token_lengths = data.length_stats(lengths)
    manifest = {"settings": wanted, "parts": {split: [dataclasses.astuple(p) for p in parts[split]] for split in SPLITS}, "report": dataclasses.asdict(report)}
    filesystem, where = storage.output_filesystem(storage.join(location, MANIFEST_FILE))
    with filesystem.open_output_stream(where) as f:
        f.write(json.dumps(manifest, indent=1).encode())
    return Prepared(location, key, parts, report, reused=False, seconds=time.perf_counter() - start)


# --- one window, in a Ray Data task ---------------------------------------------------


def prepare_window(batch: pa.Table, *, parts_dir: str, tokenizer: str, trust_remote_code: bool, max_length: int, eval_fraction: float, seed: int, pack: bool) -> pa.Table:
    """map_batches function: a window of validated records tokenized and split, its
    training and eval rows packed (with ``pack``), each split written as one part; the
    result is the window's one-row account (parts, rows, tokens, skips, lengths)."""
    tokenized = data.tokenize_batch(batch, tokenizer=tokenizer, max_length=max_length, seed=seed, eval_fraction=eval_fraction, trust_remote_code=trust_remote_code)
    usable = tokenized.filter(pc.equal(tokenized["skip_reason"], ""))
    train, held_out = usable.filter(pc.invert(usable["is_eval"])), usable.filter(usable["is_eval"])
    account: dict[str, Any] = {
        "records": tokenized.num_rows,
        "train_records": train.num_rows,
        "eval_records": held_out.num_rows,
        "skips": json.dumps(data.window_skips(tokenized)),
    }
    name = uuid.uuid4().hex  # a retried task writes new files; only the manifest's are read
    for split, rows in (
        ("train", _training_rows(train, pack, max_length, seed)),
        ("eval", _training_rows(held_out, pack, max_length, seed)),
        ("heldout", held_out.select(list(data.EVAL_TEXT_COLUMNS))),
    ):
        path = f"{name}-{split}.parquet"
        if rows.num_rows:
            _write(rows, storage.join(parts_dir, path))
        tokens = int(pc.sum(rows["num_tokens"]).as_py() or 0) if "num_tokens" in rows.column_names else 0
        account.update({f"{split}_part": path, f"{split}_rows": rows.num_rows, f"{split}_tokens": tokens})
    lengths, counts = np.unique(usable["num_tokens"].to_numpy(), return_counts=True)
    account.update({"length_values": lengths.tolist(), "length_counts": counts.tolist()})
    return pa.Table.from_pylist([account])


def _training_rows(tokenized: pa.Table, pack: bool, max_length: int, seed: int) -> pa.Table:
    """Records as the rows workers batch: input ids, a loss mask (labels are the ids
    where it is set) and token counts; packed into ``max_length``-token rows with ``pack``."""
    offsets = batching.list_offsets(tokenized["num_tokens"].to_numpy())
    labels = pc.list_flatten(tokenized["labels"]).combine_chunks()
    rows = pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(offsets, pc.list_flatten(tokenized["input_ids"]).combine_chunks()),
            "loss_mask": pa.ListArray.from_arrays(offsets, pc.not_equal(labels, IGNORE_INDEX)),
            "num_tokens": tokenized["num_tokens"].combine_chunks(),
        }
    )
    return batching.pack(rows, max_length, seed) if pack else rows


def _write(table: pa.Table, path: str) -> None:
    import pyarrow.parquet as pq

    filesystem, where = storage.output_filesystem(path)
    pq.write_table(table, where, filesystem=filesystem, row_group_size=ROW_GROUP_ROWS, compression="zstd")


# --- reading, on a training worker ----------------------------------------------------


class PartsReader:
    """Rows by position across a split's parts, reading only the row groups that hold them."""

    def __init__(self, location: str, parts: list[Part]):
        self.location = location
        self.parts = parts
        self.starts = np.cumsum([0] + [part.rows for part in parts]).tolist()
        self.num_rows = self.starts[-1]
        self.files: dict[int, Any] = {}

    def _file(self, index: int):
        """The part's Parquet file, opened once (its footer holds the row groups)."""
        import pyarrow.parquet as pq

        if index not in self.files:
            filesystem, where = storage.input_filesystem(storage.join(self.location, PARTS_DIR, self.parts[index].path))
            self.files[index] = pq.ParquetFile(filesystem.open_input_file(where))
        return self.files[index]

    def read(self, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
        """Rows ``[start, stop)`` in order."""
        pieces = []
        index = bisect.bisect_right(self.starts, start) - 1
        while start < stop:
            file, offset = self._file(index), start - self.starts[index]
            take = min(stop, self.starts[index + 1]) - start
            pieces.append(_rows_of_file(file, offset, take, columns))
            start += take
            index += 1
        return pa.concat_tables(pieces) if pieces else pa.table({})


def _rows_of_file(file, offset: int, count: int, columns: list[str] | None) -> pa.Table:
    """``count`` rows of one Parquet file from row ``offset``, through its row groups."""
    sizes = [file.metadata.row_group(i).num_rows for i in range(file.num_row_groups)]
    ends = np.cumsum(sizes)
    first = int(np.searchsorted(ends, offset, side="right"))
    last = int(np.searchsorted(ends, offset + count - 1, side="right"))
    table = file.read_row_groups(list(range(first, last + 1)), columns=columns)
    group_start = int(ends[first] - sizes[first])
    return table.slice(offset - group_start, count)


class WorkerRows:
    """One worker's share of a split: a contiguous, equal row range per rank (the rows
    beyond ``world_size`` equal shares are left out), as numpy batches for the collators."""

    def __init__(self, for_workers: dict[str, Any], split: str, rank: int, world_size: int):
        self.reader = PartsReader(for_workers["location"], [Part(*p) for p in for_workers[split]])
        self.num_rows = self.reader.num_rows // world_size
        self.first = rank * self.num_rows

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows ``[start, stop)`` of this worker's share, with their labels."""
        return batching.numpy_rows(self.reader.read(self.first + start, self.first + stop))

