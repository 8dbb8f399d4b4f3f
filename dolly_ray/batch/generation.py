"""Batch generation over a dataset with Ray Data: one InstructionGenerator per actor.

read (JSON/JSONL/Parquet files or a Hugging Face dataset) -> validate each row ->
``map_batches`` on an actor pool -> parts of a JSONL or Parquet output directory written
by the driver, in input order (``output``). Every input row becomes exactly one output
row: a row that cannot be prompted, or whose generation fails, gets an ``error`` and no
response instead of failing the job. A job that dies resumes: the rerun skips the rows
its output already holds before they reach a model.

Each row travels as its original record in JSON text (``__record``) beside the
validated request and its place in the input (``__source``, ``__row``), so a column of
mixed types (a number where the other rows have text) never breaks Arrow's
one-type-per-column rule inside the pipeline; the record is expanded back into columns
only when written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import time
from typing import Any, Iterator

import pyarrow as pa

from dolly_ray import cluster, storage
from dolly_ray.batch import output, vllm_processor
from dolly_ray.batch.config import GENERATION_FAILED, RESULT_SCHEMA, BatchConfig
from dolly_ray.cli import ConfigError, check_at_least
from dolly_ray.generate import vllm_engine
from dolly_ray.records import sources
from dolly_ray.records.sources import Columns

logger = logging.getLogger(__name__)

# Default rows per actor call, in generation batches: length sorting happens within a
# call, so a few batches' worth lets it group similar lengths.
SORT_WINDOW = 4
# The flags that say how a job runs rather than what it answers: a rerun over the same
# output may change them. The others, with the model's and the input's fingerprints, must match.
MAY_CHANGE = frozenset(
    {
        "output", "restart", "rows_per_part", "engine", "num_actors", "num_gpus_per_actor", "num_cpus_per_actor",
        "batch_size", "max_batch_tokens", "rows_per_call", "trust_remote_code", "allow_pickle",
    }
)  # fmt: skip
# What the summary counts over the output's rows.
COUNTS = ("rows", "errors", "stopped", "truncated", "prompt_tokens", "generated_tokens")

_REQUEST_SCHEMA = pa.schema(
    [
        ("__record", pa.string()), ("__source", pa.string()), ("__row", pa.int64()),
        ("__instruction", pa.string()), ("__input", pa.string()), ("__error", pa.string()),
    ]
)  # fmt: skip


def input_columns(spec: str | Columns) -> Columns:
    """The instruction/input columns: a schema name (alpaca, dolly) or ``instruction=A,input=B``."""
    return sources.parse_columns(spec, require_output=False)


# --- reading ----------------------------------------------------------------------


def _requests(source: str, rows: list[int], records: list[Any], columns: Columns, fmt: str, done: dict[str, int]) -> pa.Table:
    """The pipeline's rows for raw records: the record as JSON, its place in the input,
    its request or why there is none. Rows of ``source`` up to ``done[source]`` are
    already in the output (a resumed job) and are dropped here, before any model.

    Parquet holds only valid UTF-8, so for Parquet output a record with a lone surrogate
    in any field becomes an error row (see ``output._ParquetWriter``); JSONL keeps it exactly.
    """
    if done.get(source):
        kept = [i for i, row in enumerate(rows) if row > done[source]]
        rows, records = [rows[i] for i in kept], [records[i] for i in kept]
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
    arrays = [texts, [source] * len(rows), rows, instructions, inputs, errors]
    return pa.Table.from_arrays([pa.array(values, field.type) for values, field in zip(arrays, _REQUEST_SCHEMA)], schema=_REQUEST_SCHEMA)


def _field_with_lone_surrogate(record: dict) -> str | None:
    """The first top-level field whose name or value (at any depth) is not valid Unicode.
    (Only valid records get here, and those are objects.)"""
    for name, value in record.items():
        try:
            json.dumps({name: value}, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return name
    return None


def read_requests(source: str, columns: Columns, output_format: str, split: str = "train", done: dict[str, int] | None = None):
    """A Ray Dataset of the pipeline's rows, one per input record not ``done``, in input order."""
    return sources.read_raw(source, split, functools.partial(_requests, columns=columns, fmt=output_format, done=done or {}))


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
        results = self._generate([(instructions[i], inputs[i]) for i in good])
        columns: dict[str, list] = {name: [None] * batch.num_rows for name in RESULT_SCHEMA.names}
        columns["error"] = errors
        for i, result in zip(good, results):
            if isinstance(result, str):
                errors[i] = result
                continue
            columns["response"][i] = result.response
            columns["finish_reason"][i] = result.finish_reason
            columns["num_prompt_tokens"][i] = result.num_prompt_tokens
            columns["num_generated_tokens"][i] = result.num_generated_tokens
            columns["truncated"][i] = result.truncated
        out = pa.Table.from_pydict(columns, schema=RESULT_SCHEMA)
        for name in ("__row", "__source", "__record"):
            out = out.add_column(0, name, batch[name])
        return out

    def _generate(self, prompts: list[tuple[str, str | None]]) -> list:
        """Each prompt's result, or why it failed: a call that raises (a batch out of
        memory, a prompt the model cannot take) is answered again prompt by prompt, so a
        failure costs only its own row, as ``should_continue_on_error`` does for vLLM."""
        try:
            return self.generator.generate(prompts, self.params, batch_size=self.config.batch_size, max_batch_tokens=self.config.max_batch_tokens)
        except Exception as e:
            logger.warning("generating %d rows failed (%s: %s); answering them one by one", len(prompts), type(e).__name__, e)
        results: list = []
        for prompt in prompts:
            try:
                results.append(self.generator.generate([prompt], self.params)[0])
            except Exception as e:
                results.append(f"{GENERATION_FAILED}: {type(e).__name__}: {e}")
        return results


# --- the job ----------------------------------------------------------------------


def output_format(config: BatchConfig) -> str:
    return output.output_format(config.output, config.output_format)


def check(config: BatchConfig) -> Columns:
    """Fail fast, before Ray starts or a model loads anywhere, on what can be checked here."""
    columns = input_columns(config.columns)
    output_format(config)
    check_at_least(config, 1, "num_actors", "batch_size", "rows_per_call", "max_batch_tokens", "rows_per_part")
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


def defining(config: BatchConfig) -> dict[str, Any]:
    """What decides an output's rows: the flags not in MAY_CHANGE, local paths made
    absolute, and the model's and the input's fingerprints (as they read back from JSON)."""
    settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in MAY_CHANGE}
    settings.update(
        job="batch_generate",
        model=_absolute(config.model),
        input=_absolute(config.input),
        output_format=output_format(config),
        model_fingerprint=storage.fingerprint(config.model, contents=False),  # names, sizes, times: not gigabytes of weights
        input_fingerprint=storage.fingerprint(config.input),
    )
    return json.loads(json.dumps(settings))


def _absolute(location: str) -> str:
    return storage.absolute(location) if storage.is_local_path(location) else location


def prepare_output(config: BatchConfig, results: pa.Schema, settings: dict) -> output.Output:
    """``config.output``, new or resumed with the same ``settings`` (see ``output.prepare``)."""
    return output.prepare(config.output, output_format(config), results, settings, restart=config.restart, rows_per_part=config.rows_per_part)


def run(config: BatchConfig) -> dict[str, Any]:
    """Generate a response for every input row the output does not hold yet and write
    them; return the job's summary."""
    columns = check(config)
    out = prepare_output(config, RESULT_SCHEMA, defining(config))
    seconds = 0.0
    if not out.complete:
        with answered(config, columns, out.done) as dataset, cluster.log_pending("batch generation"):
            start = time.perf_counter()
            out.write(dataset, row_figures)
            seconds = time.perf_counter() - start
    return summary(out, seconds)


def row_figures(batch: pa.Table, first_row: int) -> dict[str, Any]:
    """What a batch of output rows adds to the summary (``first_row``: its first row's number in the output)."""
    errors = batch["error"].to_pylist()
    at = next((i for i, e in enumerate(errors) if e is not None), None)
    return {
        "rows": batch.num_rows,
        "errors": sum(e is not None for e in errors),
        "stopped": batch["finish_reason"].to_pylist().count("stop"),
        "truncated": sum(bool(t) for t in batch["truncated"].to_pylist()),
        "prompt_tokens": sum(n or 0 for n in batch["num_prompt_tokens"].to_pylist()),
        "generated_tokens": sum(n or 0 for n in batch["num_generated_tokens"].to_pylist()),
        "first_error": None if at is None else f"row {first_row + at}: {errors[at]}",
    }


def summary(out: output.Output, seconds: float) -> dict[str, Any]:
    """The counts over every row of the output, how many rows were already there
    (``rows_reused``) and how many this run answered (``rows_generated``, rows with an
    error among them); the speed is this run's."""
    total, new = out.figures(), out.figures(new_only=True)
    counts = {name: total.get(name, 0) for name in COUNTS}
    return {
        **counts,
        "rows_reused": counts["rows"] - new.get("rows", 0),
        "rows_generated": new.get("rows", 0),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(new.get("generated_tokens", 0) / seconds, 2) if seconds > 0 else None,
        "first_error": total.get("first_error"),
        "output": out.location,
    }


@contextlib.contextmanager
def answered(config: BatchConfig, columns: Columns, done: dict[str, int]) -> Iterator[Any]:
    """Start Ray and yield the lazy Ray Dataset of every input row not ``done`` (see
    ``_requests``) with its answer: ``__record`` (the row as JSON text), ``__source`` and
    ``__row`` (its place in the input) and the RESULT_SCHEMA columns, in input order
    while the block lasts. ``run`` writes it; the evaluation job scores it."""
    import ray.data

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
    context.execution_options.preserve_order = True  # the output follows the input
    try:
        # Blocks of rows_per_call rows, so that every actor gets a share of even one file.
        requests = read_requests(config.input, columns, fmt, config.split, done).repartition(target_num_rows_per_block=rows_per_call)
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
