"""Batch generation over a dataset with Ray Data: one InstructionGenerator per actor.

read (JSON/JSONL/Parquet files or a Hugging Face dataset) -> validate each row ->
``map_batches`` on an actor pool -> one JSONL or Parquet file written by the driver,
in input order. Every input row becomes exactly one output row: a row that cannot be
prompted gets an ``error`` and no response instead of failing the job.

Each row travels as its original record in JSON text (``__record``) beside the
validated request, so a column of mixed types (a number where the other rows have
text) never breaks Arrow's one-type-per-column rule inside the pipeline; the record is
expanded back into columns only when written.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import time
from pathlib import PurePosixPath
from typing import Any, Iterator

import pyarrow as pa

from dolly_ray import cluster, storage
from dolly_ray.batch import vllm_processor
from dolly_ray.batch.config import RESULT_SCHEMA, BatchConfig
from dolly_ray.cli import ConfigError, check_at_least
from dolly_ray.generate import vllm_engine
from dolly_ray.records import sources
from dolly_ray.records.sources import Columns, DataError

OUTPUT_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}  # .json gets JSON lines too
# Default rows per actor call, in generation batches: length sorting happens within a
# call, so a few batches' worth lets it group similar lengths.
SORT_WINDOW = 4

_REQUEST_SCHEMA = pa.schema(
    [("__record", pa.string()), ("__instruction", pa.string()), ("__input", pa.string()), ("__error", pa.string())]
)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def input_columns(spec: str | Columns) -> Columns:
    """The instruction/input columns: a schema name (alpaca, dolly) or ``instruction=A,input=B``."""
    return sources.parse_columns(spec, require_output=False)


# --- reading ----------------------------------------------------------------------


def _requests(source: str, rows: list[int], records: list[Any], columns: Columns, fmt: str) -> pa.Table:
    """The pipeline's rows for raw records: the record as JSON, its request, or why there is none.

    Parquet holds only valid UTF-8, so for Parquet output a record with a lone surrogate
    in any field becomes an error row (see ``_ParquetWriter``); JSONL keeps it exactly.
    """
    texts, instructions, inputs, errors = [], [], [], []
    for record in records:
        if isinstance(record, sources.Unparseable):
            texts.append("{}")
            instructions.append(None)
            inputs.append(None)
            errors.append(f"{record.reason}: {record.detail}")
            continue
        # ASCII JSON: a lone surrogate (from a "\ud800" escape) stays an escape, which Arrow accepts.
        texts.append(json.dumps(record if isinstance(record, dict) else {"value": record}, default=str))
        checked = sources.validate_record(record, columns)
        error = f"{checked['skip_reason']}: {checked['skip_detail']}" if checked["skip_reason"] else None
        if error is None and fmt == "parquet" and (field := _field_with_lone_surrogate(record)) is not None:
            error = (
                f"invalid_unicode: field {field!r} holds a lone surrogate, which Parquet cannot store; "
                "it is written as U+FFFD (JSONL output keeps it exactly)"
            )
        instructions.append(None if error else checked["instruction"])
        inputs.append(None if error else checked["input"])
        errors.append(error)
    return pa.Table.from_arrays(
        [pa.array(texts), pa.array(instructions, pa.string()), pa.array(inputs, pa.string()), pa.array(errors, pa.string())],
        schema=_REQUEST_SCHEMA,
    )


def _field_with_lone_surrogate(record: dict) -> str | None:
    """The first top-level field whose name or value (at any depth) is not valid Unicode.
    (Only valid records get here, and those are objects.)"""
    for name, value in record.items():
        try:
            json.dumps({name: value}, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return name
    return None


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


def read_requests(source: str, columns: Columns, output_format: str, split: str = "train"):
    """A Ray Dataset of the pipeline's rows, one per input record, in input order."""
    return sources.read_raw(source, split, functools.partial(_requests, columns=columns, fmt=output_format))


# --- generating -------------------------------------------------------------------


class Generate:
    """map_batches callable: loads the model once per actor, then generates batch after batch."""

    def __init__(self, config: BatchConfig, device: str):
        from dolly_ray.generate.generator import InstructionGenerator

        self.generator = InstructionGenerator.from_pretrained(
            config.model, device=device, trust_remote_code=config.trust_remote_code, allow_pickle=config.allow_pickle
        )
        self.config, self.params = config, config.params()

    def __call__(self, batch: pa.Table) -> pa.Table:
        errors = batch["__error"].to_pylist()
        good = [i for i, error in enumerate(errors) if error is None]
        instructions, inputs = batch["__instruction"].to_pylist(), batch["__input"].to_pylist()
        results = self.generator.generate(
            [(instructions[i], inputs[i]) for i in good],
            self.params,
            batch_size=self.config.batch_size,
            max_batch_tokens=self.config.max_batch_tokens,
        )
        columns: dict[str, list] = {name: [None] * batch.num_rows for name in RESULT_SCHEMA.names}
        columns["error"] = errors
        for i, result in zip(good, results):
            columns["response"][i] = result.response
            columns["finish_reason"][i] = result.finish_reason
            columns["num_prompt_tokens"][i] = result.num_prompt_tokens
            columns["num_generated_tokens"][i] = result.num_generated_tokens
            columns["truncated"][i] = result.truncated
        out = pa.Table.from_pydict(columns, schema=RESULT_SCHEMA)
        return out.add_column(0, "__record", batch["__record"])


# --- writing ----------------------------------------------------------------------


def _as_text(values: list) -> pa.Array:
    return pa.array([v if v is None or isinstance(v, str) else json.dumps(v, default=str) for v in values], pa.string())


def _infer_column(values: list) -> pa.Array:
    """Arrow's own type when the values agree on one; else text (JSON for non-strings)."""
    try:
        array = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return _as_text(values)
    return _as_text(values) if pa.types.is_null(array.type) else array


def _rows(batch: pa.Table, results: pa.Schema = RESULT_SCHEMA, valid_unicode: bool = False) -> tuple[list[str], list[dict]]:
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
    """One Parquet file; the first batch fixes the schema, later batches must fit it."""

    def __init__(self, stream, results: pa.Schema):
        self.stream, self.results, self.writer, self.rows = stream, results, None, 0

    def write(self, batch: pa.Table) -> None:
        import pyarrow.parquet as pq

        if batch.num_rows == 0:
            return
        names, records = _rows(batch, self.results, valid_unicode=True)
        if self.writer is None:
            arrays = [_infer_column([r.get(n) for r in records]) for n in names]
            originals = pa.Table.from_arrays(arrays, names=names) if names else pa.table({})
            self.writer = pq.ParquetWriter(self.stream, pa.unify_schemas([originals.schema, self.results]))
        schema = self.writer.schema
        unknown = [n for n in names if n not in schema.names]
        if unknown:
            raise DataError(
                f"column(s) {unknown} first appear after row {self.rows}; Parquet needs one schema "
                "for the whole file: write JSONL (.jsonl) instead"
            )
        originals = [field for field in schema if field.name not in self.results.names]
        arrays = [self._column(field, [r.get(field.name) for r in records]) for field in originals]
        arrays += [batch[name].combine_chunks() for name in self.results.names]
        self.writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
        self.rows += batch.num_rows

    def _column(self, field: pa.Field, values: list) -> pa.Array:
        try:
            return pa.array(values, field.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            if pa.types.is_string(field.type):
                return _as_text(values)
            raise DataError(
                f"column {field.name!r} changes type after row {self.rows} (it was {field.type}); "
                "write JSONL (.jsonl) instead"
            ) from None

    def close(self) -> None:
        import pyarrow.parquet as pq

        if self.writer is None:  # no rows at all: still a valid, empty Parquet file
            self.writer = pq.ParquetWriter(self.stream, self.results)
        self.writer.close()


def output_format(config: BatchConfig) -> str:
    if config.output_format:
        if config.output_format not in ("jsonl", "parquet"):
            raise ConfigError(f"unknown output format {config.output_format!r}; use jsonl or parquet")
        return config.output_format
    suffix = PurePosixPath(config.output).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise ConfigError(
            f"cannot tell the output format from {config.output!r}; end it in .jsonl or .parquet or pass --output-format"
        )
    return OUTPUT_FORMATS[suffix]


# --- the job ----------------------------------------------------------------------


def check(config: BatchConfig) -> Columns:
    """Fail fast, before Ray starts or a model loads anywhere, on what can be checked here."""
    columns = input_columns(config.columns)
    output_format(config)
    check_at_least(config, 1, "num_actors", "batch_size", "rows_per_call", "max_batch_tokens")
    check_at_least(config, 0.01, "num_cpus_per_actor")
    check_at_least(config, 0, "num_gpus_per_actor")
    try:
        config.params().validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if storage.missing_local(config.input):
        raise ConfigError(f"input not found: {config.input}")
    if vllm_engine.choose(config.engine, 0) == "vllm":  # a known engine, and vLLM installed if asked for
        vllm_engine.check_model(config.model)
    from dolly_ray.models import check_loadable_model

    try:
        check_loadable_model(config.model, trust_remote_code=config.trust_remote_code, allow_pickle=config.allow_pickle, max_new_tokens=config.max_new_tokens)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return columns


def run(config: BatchConfig) -> dict[str, Any]:
    """Generate a response for every input row and write them; return the job's summary."""
    with answered(config) as dataset, cluster.log_pending("batch generation"):
        return write(dataset, config.output, output_format(config))


@contextlib.contextmanager
def answered(config: BatchConfig) -> Iterator[Any]:
    """Check, start Ray, and yield the lazy Ray Dataset of every input row with its
    answer: ``__record`` (the row as JSON text) and the RESULT_SCHEMA columns, in input
    order while the block lasts. ``run`` writes it; the evaluation job scores it."""
    import ray.data

    columns = check(config)
    fmt = output_format(config)
    cluster.init_ray()
    num_gpus = cluster.gpus_per_actor(config.num_gpus_per_actor)
    num_cpus = cluster.cpus_each(config.num_cpus_per_actor, config.num_actors, default=1.0)
    cluster.check_fits(actor_request(config.num_actors, num_cpus, num_gpus))
    engine = vllm_engine.choose(config.engine, num_gpus)
    if engine == "vllm":
        vllm_engine.check_model(config.model)
    rows_per_call = config.rows_per_call or config.batch_size * SORT_WINDOW

    context = ray.data.DataContext.get_current()
    preserve_order = context.execution_options.preserve_order
    context.execution_options.preserve_order = True  # the output file follows the input
    try:
        # Blocks of rows_per_call rows, so that every actor gets a share of even one file.
        requests = read_requests(config.input, columns, fmt, config.split).repartition(target_num_rows_per_block=rows_per_call)
        if engine == "vllm":
            yield vllm_processor.generate(requests, config, num_gpus, num_cpus)
            return
        yield requests.map_batches(
            Generate,
            fn_constructor_args=(config, "cuda" if num_gpus > 0 else "cpu"),
            batch_size=rows_per_call,
            batch_format="pyarrow",
            # One call in flight per actor: calls are long, and a second one queued on a
            # busy actor could have run on an idle one.
            compute=ray.data.ActorPoolStrategy(size=config.num_actors, max_tasks_in_flight_per_actor=1),
            num_gpus=num_gpus,
            num_cpus=num_cpus,
            udf_modifying_row_count=False,
        )
    finally:
        context.execution_options.preserve_order = preserve_order


def write(dataset, output: str, fmt: str, results: pa.Schema = RESULT_SCHEMA) -> dict[str, Any]:
    """Stream the output blocks into one file (renamed into place once complete) and count.
    Each row is its record's columns and then the ``results`` columns."""
    summary = {"rows": 0, "errors": 0, "stopped": 0, "truncated": 0, "prompt_tokens": 0, "generated_tokens": 0}
    first_error = None
    filesystem, where = storage.output_filesystem(output)
    partial = where + ".partial"
    start = time.perf_counter()
    try:
        # closing: a write that fails mid-way must stop the pipeline and free its actors now.
        with filesystem.open_output_stream(partial) as stream, contextlib.closing(_batches(dataset)) as batches:
            writer = (_JsonlWriter if fmt == "jsonl" else _ParquetWriter)(stream, results)
            for batch in batches:
                batch = _output_columns(batch, results)
                writer.write(batch)
                errors = batch["error"].to_pylist()
                if first_error is None:
                    at = next((i for i, e in enumerate(errors) if e is not None), None)
                    if at is not None:
                        first_error = f"row {summary['rows'] + at + 1}: {errors[at]}"
                summary["rows"] += batch.num_rows
                summary["errors"] += sum(e is not None for e in errors)
                summary["stopped"] += batch["finish_reason"].to_pylist().count("stop")
                summary["truncated"] += sum(bool(t) for t in batch["truncated"].to_pylist())
                summary["prompt_tokens"] += sum(n or 0 for n in batch["num_prompt_tokens"].to_pylist())
                summary["generated_tokens"] += sum(n or 0 for n in batch["num_generated_tokens"].to_pylist())
            writer.close()
    except BaseException:
        filesystem.delete_file(partial)  # no half-written output that looks complete
        raise
    filesystem.move(partial, where)
    seconds = time.perf_counter() - start
    summary.update(
        seconds=round(seconds, 3),
        tokens_per_s=round(summary["generated_tokens"] / seconds, 2) if seconds > 0 else None,
        first_error=first_error,
        output=output,
    )
    return summary


def _output_columns(batch: pa.Table, results: pa.Schema) -> pa.Table:
    """The record and the result columns in their types (an engine may hand back a column
    of nulls, or extra columns of its own)."""
    columns = [batch["__record"]] + [batch[f.name].cast(f.type) for f in results]
    return pa.Table.from_arrays(columns, names=["__record", *results.names])


def actor_request(num_actors: int, num_cpus: float, num_gpus: float) -> cluster.Request:
    """The actors, and a CPU beside them for the read and validation tasks: with every CPU
    held by an actor those never start and the job would wait for ever."""
    return cluster.Request(
        unit="actor",
        count=num_actors,
        count_flag="--num-actors",
        each={"CPU": num_cpus, "GPU": num_gpus},
        fixes={"CPU": "pass --num-cpus-per-actor {fits} or fewer actors (--num-actors)", "GPU": "pass --num-gpus-per-actor {fits} or fewer actors (--num-actors)"},
        beside=cluster.DATA_CPUS,
    )


def _batches(dataset) -> Iterator[pa.Table]:
    """Output blocks in order, with a DataError raised in a worker re-raised as itself."""
    return sources.iterate(dataset, batch_size=None, batch_format="pyarrow")
