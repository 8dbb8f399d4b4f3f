"""Instruction records through Ray Data: read, validate, format, tokenize, split.

Every source becomes rows of one schema: where the row came from (``source``,
``row``), the normalised ``instruction``/``input``/``output`` strings, and a
``skip_reason`` that is empty for a usable record. Bad records are never dropped
silently: they keep their row until the report pass has counted them, and in strict
mode the first one stops the run with its source, row and field.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import gc
import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import pyarrow as pa

from dolly_ray import prompts

logger = logging.getLogger(__name__)

FILE_FORMATS = (".json", ".jsonl", ".parquet")
# Parsed records are emitted in blocks of this many rows so one large file never
# becomes one huge block.
_ROWS_PER_BLOCK = 4096

_RECORD_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("row", pa.int64()),
        ("instruction", pa.string()),
        ("input", pa.string()),
        ("output", pa.string()),
        ("skip_reason", pa.string()),
        ("skip_detail", pa.string()),
    ]
)


class DataError(ValueError):
    """Input data that cannot be used: a bad source, or a bad record in strict mode."""


@dataclass(frozen=True)
class Columns:
    """Which source columns hold the instruction, the optional input, and the response."""

    instruction: str = "instruction"
    input: str | None = "input"
    output: str | None = "output"  # None: generation, which reads no response


SCHEMAS = {
    "alpaca": Columns("instruction", "input", "output"),
    "dolly": Columns("instruction", "context", "response"),
}


def parse_columns(spec: str | Columns, *, require_output: bool = True) -> Columns:
    """A schema name (``alpaca``, ``dolly``) or ``instruction=A,input=B,output=C``.

    ``input=`` with no name means the records have no input column. Generation needs no
    output column (``require_output=False``); one named anyway is ignored.
    """
    if isinstance(spec, Columns):
        columns = spec
    elif spec in SCHEMAS:
        columns = SCHEMAS[spec]
    else:
        if "=" not in spec:
            raise DataError(f"unknown column schema {spec!r}; use one of {sorted(SCHEMAS)} or instruction=A,input=B,output=C")
        names: dict[str, str | None] = {}
        for part in spec.split(","):
            key, _, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if key not in ("instruction", "input", "output"):
                raise DataError(f"unknown column role {key!r} in {spec!r}; roles are instruction, input, output")
            names[key] = value or None
        if not names.get("instruction") or (require_output and not names.get("output")):
            needed = "both the instruction and the output column" if require_output else "the instruction column"
            raise DataError(f"column mapping {spec!r} must name {needed}")
        columns = Columns(names["instruction"], names.get("input", "input"), names.get("output") or "output")
    return columns if require_output else Columns(columns.instruction, columns.input, None)


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


# --- validation -------------------------------------------------------------------


class Unparseable(NamedTuple):
    """A row of a file that could not even be decoded into a record."""

    reason: str
    detail: str


def validate_record(record: Any, columns: Columns) -> dict[str, str]:
    """Normalise one raw record to strings, or say why it cannot be trained on."""
    out = {"instruction": "", "input": "", "output": "", "skip_reason": "", "skip_detail": ""}

    def skip(reason: str, detail: str) -> dict[str, str]:
        out["skip_reason"], out["skip_detail"] = reason, detail
        return out

    if not isinstance(record, dict):
        return skip("not_an_object", f"record is of type {type(record).__name__}, not an object")
    roles = [("instruction", columns.instruction, True), ("input", columns.input, False), ("output", columns.output, True)]
    for role, name, required in roles:
        if name is None:
            continue
        value = record.get(name)
        if name not in record or value is None:
            if required:
                absent = "missing" if name not in record else "null"
                return skip(f"{absent}_{role}", f"field {name!r} is {absent}")
            continue
        if not isinstance(value, str):
            return skip(f"non_string_{role}", f"field {name!r} is of type {type(value).__name__}, not a string")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a JSON escape such as "\ud800"
            return skip("invalid_unicode", f"field {name!r} holds a lone surrogate, which is not text")
        if required and not value.strip():
            return skip(f"empty_{role}", f"field {name!r} is empty")
        key = prompts.contains_prompt_key(value)
        if key:
            return skip(f"prompt_key_in_{role}", f"field {name!r} contains the prompt key {key!r}")
        out[role] = value
    return out


def _validated(record: Any, columns: Columns) -> dict[str, str]:
    if isinstance(record, Unparseable):
        return {"instruction": "", "input": "", "output": "", "skip_reason": record.reason, "skip_detail": record.detail}
    return validate_record(record, columns)


def validated_table(source: str, rows: list[int], records: list[Any], columns: Columns) -> pa.Table:
    """Raw records of one source as a block in the record schema (see ``read_raw``)."""
    checked = [_validated(record, columns) for record in records]
    values = {name: [r[name] for r in checked] for name in _RECORD_SCHEMA.names[2:]}
    return pa.Table.from_pydict({"source": [source] * len(rows), "row": rows, **values}, schema=_RECORD_SCHEMA)


def _parse_json_lines(data: bytes) -> Iterator[tuple[int, Any]]:
    """(line number, record) for each non-blank line; bad lines yield a skip marker.

    Lines end at ``\\n`` only, as JSON Lines defines them: a stray ``\\r`` inside a line
    must not split one record into two rows and shift every row number after it.
    """
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line.decode("utf-8-sig"))
        except UnicodeDecodeError as e:
            yield number, Unparseable("invalid_utf8", f"line is not UTF-8: {e.reason}")
        except (ValueError, RecursionError) as e:  # JSONDecodeError, or too many digits / too deep to parse
            yield number, Unparseable("malformed_json", f"line is not JSON: {e.msg if isinstance(e, json.JSONDecodeError) else e}")


def _parse_file(path: str, data: bytes) -> Iterator[tuple[int, Any]]:
    """(row number, record) pairs of one JSON array, JSONL or Parquet file.

    JSON files may hold an array or one object per line, as ``datasets`` accepts.
    Rows are numbered from 1 (the line number in JSONL, the position otherwise).
    """
    suffix = PurePosixPath(path).suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(io.BytesIO(data))
        except pa.ArrowException as e:
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        number = 0
        for batch in parquet.iter_batches(batch_size=_ROWS_PER_BLOCK):
            for record in batch.to_pylist():
                number += 1
                yield number, record
        return
    if suffix not in (".json", ".jsonl"):
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}; expected one of {FILE_FORMATS}")
    if data[:4] == b"PAR1":
        raise DataError(f"{path}: holds Parquet data, not JSON; rename it to .parquet")
    if data.removeprefix(codecs.BOM_UTF8).lstrip()[:1] == b"[":
        try:
            records = json.loads(data.decode("utf-8-sig"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise DataError(f"{path}: not a valid JSON array ({type(e).__name__}: {e})") from None
        yield from enumerate(records, start=1)
    else:
        yield from _parse_json_lines(data)


# --- reading ----------------------------------------------------------------------


def _is_saved_hf_dataset(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, name)) for name in ("dataset_info.json", "dataset_dict.json"))


def is_hub_id(source: str) -> bool:
    """``owner/name`` or ``name`` that is no local path and no URL: a Hugging Face dataset id."""
    return "://" not in source and not os.path.exists(source) and PurePosixPath(source).suffix.lower() not in FILE_FORMATS


def _files_to_tables(files: dict[str, np.ndarray], to_table: Callable) -> Iterator[pa.Table]:
    """map_batches over (path, bytes) rows: each file becomes blocks of converted records."""
    for path, blob in zip(files["path"], files["bytes"]):
        rows, records = [], []
        for number, record in _parse_file(str(path), blob):
            rows.append(number)
            records.append(record)
            if len(rows) == _ROWS_PER_BLOCK:
                yield to_table(str(path), rows, records)
                rows, records = [], []
        if rows:
            yield to_table(str(path), rows, records)


def _arrow_to_table(batch: pa.Table, source: str, to_table: Callable) -> pa.Table:
    records = batch.to_pylist()
    rows = [record.pop("__row") for record in records]
    return to_table(source, rows, records)


def load_hf_table(source: str, split: str) -> pa.Table:
    """One split of a hub dataset id (``datasets.load_dataset``) or a ``save_to_disk`` directory."""
    import datasets

    try:
        if _is_saved_hf_dataset(source):
            dataset = datasets.load_from_disk(source)
        else:
            dataset = datasets.load_dataset(source, split=split)
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise DataError(f"{source} has splits {list(dataset)}, not {split!r}")
            dataset = dataset[split]
    except DataError:
        raise
    except Exception as e:  # datasets raises many types for "not found / not loadable"
        raise DataError(f"cannot load dataset {source!r}: {type(e).__name__}: {e}") from None
    return dataset.with_format("arrow")[:]  # memory-mapped: no record data is copied


def read_raw(source: str, split: str, to_table: Callable[[str, list[int], list[Any]], pa.Table], *, use_datasets: bool | None = None):
    """Any supported source as a Ray Dataset of ``to_table(source, rows, records)`` blocks.

    ``records`` are raw: dicts as read, other JSON values, or ``Unparseable`` for lines
    that could not be decoded; ``rows`` number them from 1 within their source. Files
    (local, s3://, gs://) are read by Ray workers, each file whole by one task so row
    numbers are exact; hub ids and ``datasets`` directories are loaded with ``datasets``.
    ``use_datasets=True`` loads any source with ``datasets`` (a local copy of a hub
    dataset repository, say). Training (``read_records``) and batch generation share
    this one reader.
    """
    import ray.data

    if use_datasets is None:
        use_datasets = is_hub_id(source) or _is_saved_hf_dataset(source)
    if use_datasets:
        table = load_hf_table(source, split)
        table = table.append_column("__row", pa.array(np.arange(1, table.num_rows + 1)))
        return ray.data.from_arrow(table).map_batches(
            _arrow_to_table, fn_kwargs={"source": source, "to_table": to_table}, batch_format="pyarrow"
        )
    suffix = PurePosixPath(source).suffix.lower()
    if suffix and suffix not in FILE_FORMATS and not os.path.isdir(source):
        raise DataError(f"{source}: unsupported file type {suffix!r}; expected one of {FILE_FORMATS}")
    try:
        files = ray.data.read_binary_files(
            source, include_paths=True, file_extensions=[ext.lstrip(".") for ext in FILE_FORMATS]
        )
    except FileNotFoundError:
        raise DataError(f"cannot read {source}: no such file or directory") from None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {source}: {e}") from None
    return files.map_batches(_files_to_tables, fn_kwargs={"to_table": to_table}, batch_size=1)


def read_records(config: DataConfig):
    """A Ray Dataset of validated records, usable and skipped, in the record schema."""
    to_table = functools.partial(validated_table, columns=parse_columns(config.columns))
    return read_raw(config.source, config.split, to_table)


# --- tokenization and split -------------------------------------------------------


def in_eval_split(instruction: str, input: str, output: str, seed: int, eval_fraction: float) -> bool:
    """Decided by content and seed, so any order or parallelism gives the same split
    and duplicate records never straddle train and eval."""
    digest = hashlib.blake2b(f"{seed}\0{instruction}\0{input}\0{output}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < eval_fraction


class Tokenize:
    """map_batches callable: the tokenizer is loaded once per worker, not once per batch.

    Labels are -100 up to and including the response key, so only the response and
    ``### End`` are trained. A record longer than ``max_length`` is skipped, never
    truncated: truncation could cut the response key and leave nothing to learn.
    """

    def __init__(self, tokenizer: str, max_length: int, seed: int, eval_fraction: float, trust_remote_code: bool = False):
        self.tokenizer = prompts.load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
        self.response_id = self.tokenizer.convert_tokens_to_ids(prompts.RESPONSE_KEY)
        self.max_length, self.seed, self.eval_fraction = max_length, seed, eval_fraction

    def __call__(self, batch: pa.Table) -> pa.Table:
        records = batch.to_pylist()
        usable = [i for i, r in enumerate(records) if not r["skip_reason"]]
        texts = [prompts.format_training_text(records[i]["instruction"], records[i]["output"], records[i]["input"]) for i in usable]
        encoded = self.tokenizer(texts)["input_ids"] if texts else []
        input_ids: list[list[int]] = [[] for _ in records]
        labels: list[list[int]] = [[] for _ in records]
        is_eval = [False] * len(records)
        for i, ids in zip(usable, encoded):
            record = records[i]
            if len(ids) > self.max_length:
                record["skip_reason"] = "too_long"
                record["skip_detail"] = f"{len(ids)} tokens > max_length {self.max_length}"
                continue
            response_at = ids.index(self.response_id)
            input_ids[i] = ids
            labels[i] = [-100] * (response_at + 1) + ids[response_at + 1 :]
            is_eval[i] = in_eval_split(record["instruction"], record["input"], record["output"], self.seed, self.eval_fraction)
        return pa.Table.from_pydict(
            {
                "source": batch["source"],
                "row": batch["row"],
                "skip_reason": pa.array([r["skip_reason"] for r in records], pa.string()),
                "skip_detail": pa.array([r["skip_detail"] for r in records], pa.string()),
                "input_ids": pa.array(input_ids, pa.list_(pa.int32())),
                "labels": pa.array(labels, pa.list_(pa.int32())),
                "num_tokens": pa.array([len(ids) for ids in input_ids], pa.int32()),
                "is_eval": pa.array(is_eval, pa.bool_()),
            }
        )


TRAINING_COLUMNS = ["input_ids", "labels", "num_tokens"]


@dataclass
class DataReport:
    """What one pass over the prepared records found: counts, skips and token lengths."""

    total: int = 0
    train_rows: int = 0
    eval_rows: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    first_skip: dict[str, str] = field(default_factory=dict)  # reason -> "source row N: detail"
    token_lengths: dict[str, float] = field(default_factory=dict)  # min, median, p95, max
    train_tokens: int = 0

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


class PreparedData:
    """Tokenized records, lazily: nothing runs until a pass or a consumer pulls rows."""

    def __init__(self, config: DataConfig, tokenizer: str, *, trust_remote_code: bool = False, records=None):
        """``records``: a Ray Dataset in the record schema, instead of reading ``config.source``."""
        import ray.data

        self.config = config
        self.records = (records if records is not None else read_records(config)).map_batches(
            Tokenize,
            fn_constructor_args=(tokenizer, config.max_length, config.seed, config.eval_fraction, trust_remote_code),
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=4),
        )

    def materialize(self) -> "PreparedData":
        """Run the pipeline once into the object store (not the driver), for several passes."""
        self.records = self.records.materialize()
        return self

    def _usable(self, is_eval: bool):
        from ray.data.expressions import col

        usable = (col("skip_reason") == "") & (col("is_eval") == is_eval)
        return self.records.filter(expr=usable).select_columns(TRAINING_COLUMNS)

    @property
    def train(self):
        return self._usable(False)

    @property
    def eval(self):
        return self._usable(True)

    def report(self) -> DataReport:
        """One streaming pass that counts rows and skips; only small columns reach the driver.

        In strict mode the first bad record raises DataError naming its source, row and
        field; with no usable record at all it raises in any mode, with the counts.
        """
        report, lengths = DataReport(), []
        columns = ["source", "row", "skip_reason", "skip_detail", "num_tokens", "is_eval"]
        # closing: a strict-mode raise mid-way must stop the pipeline and free its actors now.
        with contextlib.closing(iterate(self.records.select_columns(columns))) as batches:
            for batch in batches:
                report.total += len(batch["row"])
                for source, row, reason, detail, num_tokens, is_eval in zip(*(batch[c] for c in columns)):
                    if reason:
                        report.skipped[reason] = report.skipped.get(reason, 0) + 1
                        where = f"{source} row {row}: {detail}"
                        report.first_skip.setdefault(reason, where)
                        if self.config.strict:
                            raise DataError(f"invalid record ({reason}) in {where}")
                        continue
                    lengths.append(num_tokens)
                    if is_eval:
                        report.eval_rows += 1
                    else:
                        report.train_rows += 1
                        report.train_tokens += int(num_tokens)
        if lengths:
            values = np.asarray(lengths)
            report.token_lengths = {
                "min": float(values.min()),
                "median": float(np.median(values)),
                "p95": float(np.percentile(values, 95)),
                "max": float(values.max()),
            }
        logger.info("data %s: %s", self.config.source, report.summary())
        for reason, where in sorted(report.first_skip.items()):
            logger.info("first %s skip: %s", reason, where)
        if report.train_rows == 0:
            raise DataError(f"no usable training records in {self.config.source}: {report.summary()}" + _schema_hint(report))
        return report


def _schema_hint(report: DataReport) -> str:
    if any(reason.startswith("missing_") for reason in report.skipped):
        return f"; check the column mapping (schemas: {sorted(SCHEMAS)} or instruction=A,input=B,output=C)"
    return ""


def iterate(dataset, batch_size: int | None = 4096, batch_format: str = "numpy") -> Iterator:
    """Batches of a Ray Dataset, with a DataError from a worker re-raised as itself.

    A failed pipeline keeps its actors, and their CPUs and GPUs, alive through a
    reference cycle with Ray's exception: the next job in the same process (a notebook,
    a test session) would wait for ever. So the DataError is raised without that
    exception attached, after a collection that frees the pipeline.
    """
    try:
        yield from dataset.iter_batches(batch_size=batch_size, batch_format=batch_format)
        return
    except Exception as e:
        cause = e
        while cause is not None and not isinstance(cause, DataError):
            cause = cause.__cause__ or getattr(cause, "cause", None)
        if cause is None:
            raise
        message, cause = str(cause), None
    gc.collect()
    raise DataError(message)

