"""Instruction records from any source, validated: what training and batch generation both read.

Sources: a Hugging Face hub dataset id or ``save_to_disk`` directory (read with
``datasets``), and JSON (array or one object per line), JSONL and Parquet files or
directories of them, local or at a URI (``s3://``, ``gs://``). Every record keeps where
it came from (``source``, ``row`` numbered from 1) and is validated into the
``instruction``/``input``/``output`` strings or a ``skip_reason`` that says why not, so
a bad record is counted or reported with its file, row and field, never dropped
silently. Only ``read_raw`` uses Ray (Ray Data reads the files on the cluster).
"""

from __future__ import annotations

import codecs
import functools
import gc
import io
import json
import os
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import pyarrow as pa

from dolly_ray import prompts, storage

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
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}; expected one of {storage.DATA_FILE_SUFFIXES}")
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
        use_datasets = storage.is_hub_id(source) or _is_saved_hf_dataset(source)
    if use_datasets:
        table = load_hf_table(source, split)
        table = table.append_column("__row", pa.array(np.arange(1, table.num_rows + 1)))
        return ray.data.from_arrow(table).map_batches(
            _arrow_to_table, fn_kwargs={"source": source, "to_table": to_table}, batch_format="pyarrow"
        )
    suffix = PurePosixPath(source).suffix.lower()
    if suffix and suffix not in storage.DATA_FILE_SUFFIXES and not os.path.isdir(source):
        raise DataError(f"{source}: unsupported file type {suffix!r}; expected one of {storage.DATA_FILE_SUFFIXES}")
    try:
        files = ray.data.read_binary_files(
            source, include_paths=True, file_extensions=[ext.lstrip(".") for ext in storage.DATA_FILE_SUFFIXES]
        )
    except FileNotFoundError:
        raise DataError(f"cannot read {source}: no such file or directory") from None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {source}: {e}") from None
    return files.map_batches(_files_to_tables, fn_kwargs={"to_table": to_table}, batch_size=1)


def read_records(source: str, columns: str | Columns = "alpaca", split: str = "train"):
    """A Ray Dataset of validated records, usable and skipped, in the record schema."""
    to_table = functools.partial(validated_table, columns=parse_columns(columns))
    return read_raw(source, split, to_table)


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

