"""The batch jobs' output: a directory of parts, in input order, that a killed job resumes.

    answers/
      part-000000.jsonl ...        the rows in input order (part names sort in it); .parquet for Parquet
      _progress/job.json           the settings the rows were answered with
      _progress/part-000000.json   a part's commit record: its rows, its figures, and the last
                                   input row it holds of each input file
      _SUCCESS                     the output's figures, once every row is in

The driver receives the answered rows in input order and writes them part by part; a
part counts once its record is written after it. The rows of one input file reach the
driver in order, so the rows of a file already written are always those up to the last
one recorded: a rerun with the same settings deletes any part without a record (the one
being written when the job died), drops the rows already written as it reads the input,
before they reach a model, and numbers its parts after the last. Ray Data and pyarrow
skip names that start with ``_`` when they read a directory, so ``answers/`` reads as
the rows alone. Why not Ray Data's own checkpointing: docs/generation.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
import re
import time
from typing import Any, Callable, Iterator

import pyarrow as pa

from dolly_ray import storage
from dolly_ray.cli import ConfigError
from dolly_ray.records import sources
from dolly_ray.records.sources import DataError

logger = logging.getLogger(__name__)

OUTPUT_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}  # .json gets JSON lines too
PROGRESS, JOB_FILE, SUCCESS = "_progress", "job.json", "_SUCCESS"
PART = re.compile(r"part-(\d{6})\.(jsonl|parquet)$")
# A part is committed at --rows-per-part rows or this long after its first row, whichever
# comes first, so a killed job answers again at most that much (and the rows in flight).
PART_SECONDS = 600.0

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def output_format(output: str, requested: str | None) -> str:
    """jsonl or parquet: as requested, else from the output's suffix, else jsonl."""
    if requested:
        if requested not in ("jsonl", "parquet"):
            raise ConfigError(f"unknown output format {requested!r}; use jsonl or parquet")
        return requested
    suffix = posixpath.splitext(output.rstrip("/"))[1].lower()
    if suffix and suffix not in OUTPUT_FORMATS:
        raise ConfigError(f"cannot tell the output format from {output!r}; end it in .jsonl or .parquet, or none, or pass --output-format")
    return OUTPUT_FORMATS.get(suffix, "jsonl")


def add_up(total: dict, more: dict) -> dict:
    """Two parts' figures as one: numbers add, dicts add key by key, and anything else
    (the first error) keeps the first one set."""
    out = dict(total)
    for key, value in more.items():
        mine = out.get(key)
        if isinstance(value, dict):
            out[key] = add_up(mine or {}, value)
        elif mine is None:
            out[key] = value
        elif isinstance(value, (int, float)):
            out[key] = mine + value
    return out


def prepare(location: str, fmt: str, results: pa.Schema, settings: dict, *, restart: bool, rows_per_part: int) -> Output:
    """The output at ``location``, checked before Ray starts: new, or one this job's
    earlier attempts wrote with the same ``settings`` (``restart`` deletes it first).
    Other settings over rows already written would mix two jobs' answers: refused."""
    output = Output(location, fmt, results, settings, rows_per_part)
    saved = output.saved_settings()
    if restart and saved is not None:
        logger.info("--restart: deleting %s", location)
        storage.delete_dir(location)
        saved = None
    output.load()
    if saved is not None and saved != settings and output.records:
        changes = "; ".join(f"{key}: {_show(saved.get(key))} -> {_show(settings.get(key))}" for key in sorted(set(saved) | set(settings)) if saved.get(key) != settings.get(key))
        raise ConfigError(
            f"output {location} holds {output.rows} rows answered with other settings ({changes}); "
            "pass another output, or --restart to delete it and answer every row afresh"
        )
    output.settings_saved = saved == settings
    output.complete = output.complete and output.settings_saved  # done with other settings, over no rows
    return output


class Output:
    """An output directory: the parts it holds (``records``, in order) and the parts this
    run adds; ``done`` maps each input file to the last of its rows already written."""

    def __init__(self, location: str, fmt: str, results: pa.Schema, settings: dict, rows_per_part: int):
        from pyarrow import fs

        self.location, self.fmt, self.results, self.settings, self.rows_per_part = location, fmt, results, settings, rows_per_part
        self.fs, self.root = fs.FileSystem.from_uri(storage.absolute(location))
        self.records: list[dict] = []
        self.rows = 0  # in the parts committed so far
        self.reused = 0  # parts already there when this run started
        self.complete = self.settings_saved = False
        self.schema: pa.Schema | None = None  # Parquet: the first part's, which every part shares

    @property
    def done(self) -> dict[str, int]:
        done: dict[str, int] = {}
        for record in self.records:
            for source, row in record["last_rows"].items():
                done[source] = max(done.get(source, 0), row)
        return done

    def figures(self, *, new_only: bool = False) -> dict:
        """The summed figures of every part, or of those this run wrote."""
        total: dict = {}
        for record in self.records[self.reused if new_only else 0 :]:
            total = add_up(total, record["figures"])
        return total

    def saved_settings(self) -> dict | None:
        """The settings of the job that wrote this output; None where nothing is there.
        Refuses a file, and a directory holding files no batch job wrote."""
        from pyarrow import fs

        kind = self.fs.get_file_info(self.root).type
        if kind == fs.FileType.File:
            raise ConfigError(f"output {self.location} is a file; the output is a directory of parts: name a new directory or one this job wrote")
        if self._exists(f"{PROGRESS}/{JOB_FILE}"):
            return self._read_json(f"{PROGRESS}/{JOB_FILE}")
        if kind == fs.FileType.Directory and set(self._names("")) - {PROGRESS}:
            raise ConfigError(f"output {self.location} holds files that are not a batch job's output; name a new or empty directory")
        return None

    def load(self) -> None:
        """Read the committed parts' records; delete the parts that have none."""
        data = {int(m[1]): name for name in self._names("") if (m := PART.fullmatch(name))}
        committed = sorted(int(m[1]) for name in self._names(PROGRESS) if (m := re.fullmatch(r"part-(\d{6})\.json", name)))
        for number in sorted(set(data) - set(committed)):
            logger.info("deleting %s: its job stopped before it was whole", data[number])
            self.fs.delete_file(f"{self.root}/{data[number]}")
        if missing := sorted(set(committed) - set(data)):
            raise ConfigError(f"output {self.location}: part(s) {missing} were written but their files are gone; pass --restart to answer every row afresh")
        self.records = [self._read_json(f"{PROGRESS}/part-{number:06d}.json") for number in committed]
        self.rows = sum(record["rows"] for record in self.records)
        self.reused, self.complete = len(self.records), self._exists(SUCCESS)

    def write(self, dataset, figures: Callable[[pa.Table, int], dict]) -> None:
        """Stream the answered rows, in input order, into parts, each committed once
        whole; then mark the output complete. ``figures(batch, first_row)`` is what a
        batch adds to the summary (``first_row``: its first row's number in the output)."""
        part = None
        try:
            # closing: a write that fails mid-way must stop the pipeline and free its actors now.
            with contextlib.closing(sources.iterate(dataset, batch_size=None, batch_format="pyarrow")) as batches:
                for batch in batches:
                    while batch.num_rows:
                        part = part or self._open_part()
                        rows = batch.slice(0, self.rows_per_part - part.rows)
                        part.write(rows, figures(rows, self.rows + part.rows + 1))
                        batch = batch.slice(rows.num_rows)
                        if part.rows == self.rows_per_part or time.monotonic() - part.opened >= PART_SECONDS:
                            self._commit(part)
                            part = None
            if part is not None:
                self._commit(part)
                part = None
        finally:
            if part is not None:  # its rows are answered again on a rerun
                part.abort()
        self._write_json(SUCCESS, self.figures())
        self.complete = True

    def _open_part(self) -> _Part:
        if not self.settings_saved:  # before the first part: a part without them could not be checked
            self._write_json(f"{PROGRESS}/{JOB_FILE}", self.settings)
            self.settings_saved = True
        if self.fmt == "parquet" and self.schema is None and self.records:  # resumed: the parts written so far fixed it
            import pyarrow.parquet as pq

            self.schema = pq.read_schema(f"{self.root}/part-000000.parquet", filesystem=self.fs)
        return _Part(self, len(self.records), self.rows + 1)

    def _commit(self, part: _Part) -> None:
        part.close()
        if self.fmt == "parquet":
            self.schema = part.writer.schema
        record = {"rows": part.rows, "last_rows": part.last_rows, "figures": part.figures}
        self._write_json(f"{PROGRESS}/part-{len(self.records):06d}.json", record)
        self.records.append(record)
        self.rows += part.rows

    def _names(self, folder: str) -> list[str]:
        from pyarrow import fs

        where = f"{self.root}/{folder}".rstrip("/")
        return [posixpath.basename(info.path) for info in self.fs.get_file_info(fs.FileSelector(where, allow_not_found=True))]

    def _exists(self, name: str) -> bool:
        from pyarrow import fs

        return self.fs.get_file_info(f"{self.root}/{name}").type == fs.FileType.File

    def _read_json(self, name: str) -> Any:
        with self.fs.open_input_stream(f"{self.root}/{name}") as stream:
            return json.loads(stream.read())

    def _write_json(self, name: str, value: Any) -> None:
        """Written whole or not at all: under a temporary name, then moved into place."""
        path = f"{self.root}/{name}"
        self.fs.create_dir(posixpath.dirname(path), recursive=True)
        with self.fs.open_output_stream(path + ".partial") as stream:
            stream.write(json.dumps(value, indent=1, sort_keys=True).encode())
        self.fs.move(path + ".partial", path)


class _Part:
    """One part being written: its file, the last row of each input file it holds, its figures."""

    def __init__(self, output: Output, number: int, first_row: int):
        self.output, self.path = output, f"{output.root}/part-{number:06d}.{output.fmt}"
        self.stream = output.fs.open_output_stream(self.path)
        if output.fmt == "jsonl":
            self.writer: _JsonlWriter | _ParquetWriter = _JsonlWriter(self.stream, output.results)
        else:
            self.writer = _ParquetWriter(self.stream, output.results, output.schema, first_row)
        self.rows, self.last_rows, self.figures, self.opened = 0, {}, {}, time.monotonic()

    def write(self, batch: pa.Table, figures: dict) -> None:
        for source, row in zip(batch["__source"].to_pylist(), batch["__row"].to_pylist()):
            self.last_rows[source] = row  # a file's rows come in order
        self.writer.write(_output_columns(batch, self.output.results))
        self.rows += batch.num_rows
        self.figures = add_up(self.figures, figures)

    def close(self) -> None:
        self.writer.close()
        self.stream.close()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.stream.close()
        self.output.fs.delete_file(self.path)


def read_rows(location: str) -> Iterator[dict]:
    """Every row of an output as a dict, in input order: for small outputs (tests, a
    notebook); at scale read the directory with Ray Data (``ray.data.read_json(location)``)."""
    import pyarrow.parquet as pq
    from pyarrow import fs

    filesystem, root = fs.FileSystem.from_uri(storage.absolute(location))
    parts = sorted(info.path for info in filesystem.get_file_info(fs.FileSelector(root)) if PART.fullmatch(posixpath.basename(info.path)))
    for path in parts:
        if path.endswith(".parquet"):
            yield from pq.read_table(path, filesystem=filesystem).to_pylist()
            continue
        with filesystem.open_input_stream(path) as stream:
            lines = stream.read().decode().split("\n")  # not splitlines: U+2028 may sit inside a value
        yield from (json.loads(line) for line in lines if line)


# --- the part files ----------------------------------------------------------------


def _output_columns(batch: pa.Table, results: pa.Schema) -> pa.Table:
    """The record and the result columns in their types (an engine may hand back a column
    of nulls, or extra columns of its own)."""
    columns = [batch["__record"]] + [batch[f.name].cast(f.type) for f in results]
    return pa.Table.from_arrays(columns, names=["__record", *results.names])


def _without_lone_surrogates(value: Any) -> Any:
    """``value`` with every lone surrogate replaced by U+FFFD. After ``json.loads`` any
    surrogate left in a string is lone: escaped pairs have become one character."""
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_without_lone_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_without_lone_surrogates(k): _without_lone_surrogates(v) for k, v in value.items()}
    return value


def _as_text(values: list) -> pa.Array:
    return pa.array([v if v is None or isinstance(v, str) else json.dumps(v, default=str) for v in values], pa.string())


def _infer_column(values: list) -> pa.Array:
    """Arrow's own type when the values agree on one; else text (JSON for non-strings)."""
    try:
        array = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return _as_text(values)
    return _as_text(values) if pa.types.is_null(array.type) else array


def _rows(batch: pa.Table, results: pa.Schema, valid_unicode: bool = False) -> tuple[list[str], list[dict]]:
    """The original records of an output batch, with columns named like a result renamed
    original_<name> (and, if ``valid_unicode``, lone surrogates replaced: such rows carry an error)."""
    records = [json.loads(text) for text in batch["__record"].to_pylist()]
    if valid_unicode:
        records = [_without_lone_surrogates(record) for record in records]
    names: dict[str, None] = {}
    for record in records:
        for name in list(record):
            if name in results.names:
                record[f"original_{name}"] = record.pop(name)
        names.update(dict.fromkeys(record))
    return list(names), records


class _JsonlWriter:
    def __init__(self, stream, results: pa.Schema):
        self.stream, self.results = stream, results

    def write(self, batch: pa.Table) -> None:
        _, records = _rows(batch, self.results)
        results = batch.select(self.results.names).to_pylist()
        lines = (json.dumps({**record, **result}, ensure_ascii=False) + "\n" for record, result in zip(records, results))
        # A lone surrogate can only sit inside a JSON string, where backslashreplace
        # writes it back as the very "\udXXX" escape the input had.
        self.stream.write("".join(lines).encode("utf-8", errors="backslashreplace"))

    def close(self) -> None:
        pass


class _ParquetWriter:
    """One Parquet part. The output's first batch fixes the schema (``schema`` is None
    until then); every later batch, in any part, must fit it, so the parts read as one table."""

    def __init__(self, stream, results: pa.Schema, schema: pa.Schema | None, first_row: int):
        import pyarrow.parquet as pq

        self.stream, self.results, self.schema, self.row = stream, results, schema, first_row
        self.writer = pq.ParquetWriter(stream, schema) if schema is not None else None

    def write(self, batch: pa.Table) -> None:
        import pyarrow.parquet as pq

        names, records = _rows(batch, self.results, valid_unicode=True)
        if self.writer is None:
            arrays = [_infer_column([r.get(n) for r in records]) for n in names]
            originals = pa.Table.from_arrays(arrays, names=names) if names else pa.table({})
            self.schema = pa.unify_schemas([originals.schema, self.results])
            self.writer = pq.ParquetWriter(self.stream, self.schema)
        unknown = [n for n in names if n not in self.schema.names]
        if unknown:
            raise DataError(
                f"column(s) {unknown} first appear at output row {self.row} or after; Parquet needs one "
                "schema for the whole output: write JSONL (--output-format jsonl) instead"
            )
        originals = [field for field in self.schema if field.name not in self.results.names]
        arrays = [self._column(field, [r.get(field.name) for r in records]) for field in originals]
        arrays += [batch[name].combine_chunks() for name in self.results.names]
        self.writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))
        self.row += batch.num_rows

    def _column(self, field: pa.Field, values: list) -> pa.Array:
        try:
            return pa.array(values, field.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            if pa.types.is_string(field.type):
                return _as_text(values)
            raise DataError(
                f"column {field.name!r} changes type at output row {self.row} or after (it was {field.type}); "
                "write JSONL (--output-format jsonl) instead"
            ) from None

    def close(self) -> None:
        self.writer.close()


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else repr(value)
