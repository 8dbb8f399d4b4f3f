"""Score a checkpoint over a whole dataset of instruction records with reference outputs.

The batch-generation pipeline answers every record greedily (Ray Data actors, either
engine); in the same pipeline each answer is scored against its record's output
(``scoring``: exact match, ROUGE-L, stopped at ``### End``), and the driver sums the
figures per task as the scored rows stream in. A record the batch job cannot prompt, or one without a
text reference, is counted by reason and not scored. With ``--answers`` the scored rows
are kept as a batch output, which a rerun resumes: the sums of the rows already there
come from its parts' records, and only the other records are answered.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from dolly_ray import cluster, storage
from dolly_ray.batch import generation, output
from dolly_ray.batch.config import RESULT_SCHEMA, BatchConfig
from dolly_ray.cli import ConfigError, option
from dolly_ray.generate import scoring
from dolly_ray.records import sources


@dataclass
class EvalConfig:
    """One evaluation; the CLI flags fill it one to one."""

    model: str = option(dataclasses.MISSING, "checkpoint directory (local or s3://...) or Hugging Face model id")
    dataset: str = option(dataclasses.MISSING, "records with reference outputs: JSON/JSONL/Parquet file or directory, a datasets dir, or a hub dataset id")
    columns: str = option("alpaca", "schema name (alpaca, dolly) or instruction=A,input=B,output=C (output: the reference)")
    split: str = option("train", "split of a Hugging Face dataset")
    task_column: str = option("task", "column naming each record's task, for figures per task (records without it count under '(none)')")
    answers: str | None = option(None, "also keep every answer beside its record in this output directory (local or remote; a .parquet name: Parquet parts), which a rerun resumes")
    restart: bool = option(False, "delete what an earlier run wrote to --answers and answer every record afresh (without it a rerun resumes, and refuses other settings)")
    rows_per_part: int = option(10_000, "records per --answers part file; a job that dies answers again at most the part it was writing")
    engine: str = option("auto", "hf (transformers), vllm (vLLM through ray.data.llm) or auto: vllm where vLLM is installed and actors get GPUs")
    num_actors: int = option(1, "generation actors, each holding one model")
    num_gpus_per_actor: float | None = option(None, "GPUs per actor (default: 1 when the cluster has GPUs, else 0)")
    num_cpus_per_actor: float | None = option(None, "CPUs per actor (default: as the batch-generation job)")
    batch_size: int = option(16, "prompts per model.generate call")
    max_new_tokens: int = option(256, "longest answer, in tokens")
    trust_remote_code: bool = option(False, "run model code from the hub (only for models you trust)")
    allow_pickle: bool = option(False, "allow non-safetensors weights (loading a pickle can run code)")

    def batch_config(self) -> BatchConfig:
        """The batch-generation job that answers every record greedily (and writes the
        answers only where ``--answers`` asks)."""
        columns = sources.parse_columns(self.columns)
        return BatchConfig(
            model=self.model,
            input=self.dataset,
            output=self.answers or "",
            output_format=None if self.answers else "jsonl",
            columns=f"instruction={columns.instruction},input={columns.input or ''}",
            split=self.split,
            engine=self.engine,
            num_actors=self.num_actors,
            num_gpus_per_actor=self.num_gpus_per_actor,
            num_cpus_per_actor=self.num_cpus_per_actor,
            batch_size=self.batch_size,
            max_new_tokens=self.max_new_tokens,
            greedy=True,
            trust_remote_code=self.trust_remote_code,
            allow_pickle=self.allow_pickle,
            restart=self.restart,
            rows_per_part=self.rows_per_part,
        )


NO_TASK = "(none)"
# What scoring adds to each answered row (and to the --answers file): its task, why it
# was not scored (empty when it was), and its figures.
SCORE_SCHEMA = pa.schema([("eval_task", pa.string()), ("eval_skip", pa.string()), *((name, pa.float64()) for name in scoring.FIGURES)])


def run(config: EvalConfig) -> dict[str, Any]:
    """Answer, score and average; the summary is the job's last output line."""
    if storage.missing_local(config.dataset):
        raise ConfigError(f"dataset not found: {config.dataset}")
    batch_config = config.batch_config()
    columns = generation.check(batch_config)
    answers = None
    if config.answers:
        settings = {**generation.defining(batch_config), "job": "evaluate", "columns": config.columns, "task_column": config.task_column}
        answers = generation.prepare_output(batch_config, pa.unify_schemas([RESULT_SCHEMA, SCORE_SCHEMA]), settings)
    start = time.perf_counter()
    totals = answers.figures() if answers and answers.complete else _answer_and_score(config, batch_config, columns, answers)
    generated = (answers.figures(new_only=True) if answers else totals).get("records", 0)
    return {
        "model": config.model,
        "dataset": config.dataset,
        **summary(totals),
        "rows_reused": totals.get("records", 0) - generated,
        "rows_generated": generated,
        "answers": config.answers,
        "seconds": round(time.perf_counter() - start, 3),
    }


def _answer_and_score(config: EvalConfig, batch_config: BatchConfig, columns: sources.Columns, answers: output.Output | None) -> dict:
    """The summed figures of every record: the records ``answers`` does not hold yet are
    answered, scored and written there (the others' sums come from its parts), or, with
    no ``answers``, scored and summed as they stream in."""
    reference = sources.parse_columns(config.columns).output
    with generation.answered(batch_config, columns, answers.done if answers else {}) as answered, cluster.log_pending("evaluation"):
        scored = answered.map_batches(_score_batch, fn_kwargs={"reference": reference, "task_column": config.task_column}, batch_format="pyarrow")
        if answers:
            answers.write(scored, figures)
            return answers.figures()
        totals: dict = {}
        names = [*SCORE_SCHEMA.names, "num_generated_tokens"]
        for batch in sources.iterate(scored.select_columns(names), batch_size=None, batch_format="pyarrow"):
            totals = output.add_up(totals, figures(batch, 0))
        return totals


def figures(batch: pa.Table, first_row: int) -> dict[str, Any]:
    """What a batch of scored rows adds to the sums: its records and generated tokens,
    the rows not scored by reason, and the figures' sums per task (a few numbers per task,
    so a part's record keeps them). ``first_row``, which ``Output.write`` passes, is not needed."""
    sums: dict[str, Any] = {"records": batch.num_rows, "generated_tokens": sum(n or 0 for n in batch["num_generated_tokens"].to_pylist()), "skipped": {}, "tasks": {}}
    values = zip(batch["eval_task"].to_pylist(), batch["eval_skip"].to_pylist(), *(batch[name].to_pylist() for name in scoring.FIGURES))
    for task, skip, *scores in values:
        if skip:
            sums["skipped"][skip] = sums["skipped"].get(skip, 0) + 1
            continue
        task_sums = sums["tasks"].setdefault(task, {"records": 0, **dict.fromkeys(scoring.FIGURES, 0.0)})
        task_sums["records"] += 1
        for name, value in zip(scoring.FIGURES, scores):
            task_sums[name] += value
    return sums


def summary(totals: dict) -> dict[str, Any]:
    """The means overall and per task, from the sums (``figures``)."""
    tasks = totals.get("tasks", {})
    scored = sum(sums["records"] for sums in tasks.values())

    def means(sums: dict, count: int) -> dict[str, float]:
        return {name: round(sums[name] / count, 4) if count else 0.0 for name in scoring.FIGURES}

    overall = {name: sum(sums[name] for sums in tasks.values()) for name in scoring.FIGURES}
    return {
        "records": totals.get("records", 0),
        "scored": scored,
        "skipped": dict(sorted(totals.get("skipped", {}).items())),
        **means(overall, scored),
        "per_task": {task: {"records": sums["records"], **means(sums, sums["records"])} for task, sums in sorted(tasks.items())},
        "generated_tokens": totals.get("generated_tokens", 0),
    }


def _score_batch(batch: pa.Table, *, reference: str, task_column: str) -> pa.Table:
    """Answered rows -> the same rows and their SCORE_SCHEMA columns."""
    records = [json.loads(text) for text in batch["__record"].to_pylist()]
    out: dict[str, list] = {name: [] for name in SCORE_SCHEMA.names}
    for record, response, finish_reason, error in zip(
        records, batch["response"].to_pylist(), batch["finish_reason"].to_pylist(), batch["error"].to_pylist()
    ):
        task, expected = record.get(task_column), record.get(reference)
        skip = ""
        if error:
            skip = error.split(":", 1)[0]  # the batch job's reason, e.g. missing_instruction
        elif not isinstance(expected, str):
            skip = "missing_reference" if expected is None else "non_string_reference"
        figures = scoring.score(response, expected, finish_reason) if not skip else None
        out["eval_task"].append(NO_TASK if task is None else str(task))
        out["eval_skip"].append(skip)
        for name in scoring.FIGURES:
            out[name].append(getattr(figures, name) if figures else 0.0)
    for field in SCORE_SCHEMA:
        batch = batch.append_column(field, pa.array(out[field.name], field.type))
    return batch


def report_lines(summary: dict) -> list[str]:
    """Per-task and overall figures, for people."""
    header = f"{'task':24s} {'records':>8s} {'exact':>7s} {'rouge_l':>8s} {'stopped':>8s}"
    lines = [header]
    for task, figures in summary["per_task"].items():
        lines.append(f"{task[:24]:24s} {figures['records']:8d} {figures['exact_match']:7.3f} {figures['rouge_l']:8.3f} {figures['stopped_at_end']:8.3f}")
    lines.append(f"{'overall':24s} {summary['scored']:8d} {summary['exact_match']:7.3f} {summary['rouge_l']:8.3f} {summary['stopped_at_end']:8.3f}")
    if summary["skipped"]:
        lines.append("not scored: " + ", ".join(f"{reason} {count}" for reason, count in summary["skipped"].items()))
    return lines
