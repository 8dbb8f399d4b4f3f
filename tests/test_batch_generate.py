"""The Ray Data batch-generation job: every input row out, bad rows flagged, JSONL and
Parquet, and a job killed mid-way resumed without answering its rows again."""

import argparse
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from dolly_ray import cli, cluster, testing
from dolly_ray.batch import generation, output, vllm_processor
from dolly_ray.batch.config import RESULT_SCHEMA, BatchConfig
from dolly_ray.cli import ConfigError
from dolly_ray.generate.generator import GenerationParams, InstructionGenerator
from dolly_ray.records.sources import Columns, DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = os.path.join(ROOT, "jobs", "batch_generate.py")

# (record, expected error prefix or None for a good row)
ROWS = [
    ({"instruction": "Reverse the letters of the word.", "input": "abc", "id": 1}, None),
    ({"input": "no instruction here", "id": 2}, "missing_instruction"),
    ({"instruction": None, "id": 3}, "null_instruction"),
    ({"instruction": 42, "id": 4}, "non_string_instruction"),
    ({"instruction": "", "id": 5}, "empty_instruction"),
    ({"instruction": "What is 2 plus 3?", "id": 6, "response": "5"}, None),
    ({"instruction": "Sort the numbers.", "input": 7, "id": 7}, "non_string_input"),
    ({"instruction": "Convert the text to uppercase.", "input": "ab cd", "id": 8}, None),
]
PARAMS = dict(greedy=True, max_new_tokens=6, batch_size=2, num_actors=1, num_cpus_per_actor=1)


def _write_jsonl(path, rows, rename=None):
    rename = rename or {}
    with open(path, "w") as f:
        for record, _ in rows:
            f.write(json.dumps({rename.get(k, k): v for k, v in record.items()}) + "\n")
        f.write("this line is not JSON\n")
    return str(path)


@pytest.fixture(scope="module")
def expected(tiny_model_dir):
    """What InstructionGenerator answers for the good rows, one at a time."""
    generator = InstructionGenerator.from_pretrained(tiny_model_dir)
    params = GenerationParams(greedy=True, max_new_tokens=PARAMS["max_new_tokens"])
    return {
        record["id"]: generator.generate([(record["instruction"], record.get("input"))], params)[0]
        for record, error in ROWS
        if error is None
    }


def _check(rows_out, expected):
    assert len(rows_out) == len(ROWS) + 1  # the unparseable line is a row too
    for out, (record, error) in zip(rows_out[: len(ROWS)], ROWS, strict=True):  # the unparseable line is checked below
        assert out["id"] == record["id"]  # input order
        if error is None:
            want = expected[record["id"]]
            assert out["error"] is None
            assert out["response"] == want.response
            assert out["finish_reason"] == want.finish_reason
            assert out["num_prompt_tokens"] == want.num_prompt_tokens
            assert out["num_generated_tokens"] == want.num_generated_tokens
        else:
            assert out["error"].startswith(error), out
            assert out["response"] is None and out["num_generated_tokens"] is None
    assert rows_out[-1]["error"].startswith("malformed_json")


def test_jsonl_in_jsonl_out(ray_local, tiny_model_dir, tmp_path, expected):
    source = _write_jsonl(tmp_path / "in.jsonl", ROWS)
    output_dir = tmp_path / "out" / "responses"
    summary = generation.run(BatchConfig(model=tiny_model_dir, input=source, output=str(output_dir), **PARAMS))
    rows_out = list(output.read_rows(str(output_dir)))
    _check(rows_out, expected)
    assert rows_out[3]["instruction"] == 42  # the original value, untouched
    assert rows_out[5]["original_response"] == "5"  # an input column named like a result is kept aside
    assert summary["rows"] == 9 and summary["errors"] == 6 and summary["output"] == str(output_dir)
    assert (summary["rows_reused"], summary["rows_generated"]) == (0, 9)
    assert summary["generated_tokens"] == sum(r.num_generated_tokens for r in expected.values())
    assert summary["tokens_per_s"] > 0
    assert sorted(os.listdir(output_dir)) == ["_SUCCESS", "_progress", "part-000000.jsonl"]  # JSON lines by default


def test_column_mapping_and_parquet_out(ray_local, tiny_model_dir, tmp_path, expected):
    source = _write_jsonl(tmp_path / "in.jsonl", ROWS, rename={"instruction": "prompt", "input": "context"})
    output_dir = tmp_path / "responses.parquet"
    summary = generation.run(
        BatchConfig(
            model=tiny_model_dir, input=source, output=str(output_dir), columns="instruction=prompt,input=context", **PARAMS
        )
    )
    table = pq.read_table(output_dir)  # the directory reads as one table: pyarrow skips the _ names
    rows_out = table.to_pylist()
    _check(rows_out, expected)
    assert rows_out[3]["prompt"] == "42"  # a mixed-type column becomes text in Parquet
    assert str(table.schema.field("num_generated_tokens").type) == "int64"
    assert summary["rows"] == 9 and summary["errors"] == 6


def test_lone_surrogates_flag_the_row_in_parquet_and_stay_exact_in_jsonl(ray_local, tiny_model_dir, tmp_path):
    # JSON lets a string escape half of a surrogate pair; such a value is not text, and
    # Parquet stores only valid UTF-8.
    lines = [
        r'{"instruction": "Say hi.", "note": "plain", "id": 1}',
        r'{"instruction": "Say hi.", "note": "bad \udfff here", "id": 2}',
        r'{"instruction": "Say \ud800 hi.", "note": "plain", "id": 3}',
        r'{"instruction": "Say hi.", "note": "a pair \ud83d\ude00 is fine", "id": 4}',
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")

    def run(name):
        return generation.run(BatchConfig(model=tiny_model_dir, input=str(source), output=str(tmp_path / name), **PARAMS))

    summary = run("out.parquet")
    rows = list(output.read_rows(str(tmp_path / "out.parquet")))
    assert [r["id"] for r in rows] == [1, 2, 3, 4] and summary["errors"] == 2
    assert rows[0]["error"] is None and rows[3]["error"] is None and rows[3]["note"] == "a pair \U0001f600 is fine"
    assert rows[1]["error"].startswith("invalid_unicode: field 'note'") and "U+FFFD" in rows[1]["error"]
    assert rows[1]["response"] is None and rows[1]["note"] == "bad \ufffd here"
    assert rows[2]["error"].startswith("invalid_unicode: field 'instruction'") and rows[2]["instruction"] == "Say \ufffd hi."

    summary = run("out.jsonl")
    rows = list(output.read_rows(str(tmp_path / "out.jsonl")))
    assert [r["id"] for r in rows] == [1, 2, 3, 4] and summary["errors"] == 1
    assert rows[1]["error"] is None and isinstance(rows[1]["response"], str) and rows[1]["note"] == "bad \udfff here"
    assert rows[2]["error"].startswith("invalid_unicode") and rows[2]["instruction"] == "Say \ud800 hi."


def test_saved_hf_dataset_in(ray_local, tiny_model_dir, tmp_path, expected):
    import datasets

    good = [record for record, error in ROWS if error is None]
    records = good + [{"instruction": None, "input": None, "id": 99}]
    datasets.Dataset.from_list([{**r, "input": r.get("input"), "response": r.get("response")} for r in records]).save_to_disk(
        str(tmp_path / "ds")
    )
    output_dir = tmp_path / "out.data"
    summary = generation.run(
        BatchConfig(model=tiny_model_dir, input=str(tmp_path / "ds"), output=str(output_dir), output_format="jsonl", **PARAMS)
    )
    rows_out = list(output.read_rows(str(output_dir)))
    assert [r["id"] for r in rows_out] == [r["id"] for r in records]
    assert [r["response"] for r in rows_out[:-1]] == [expected[r["id"]].response for r in good]
    assert rows_out[-1]["error"].startswith("null_instruction") and rows_out[-1]["response"] is None
    assert summary["errors"] == 1


def test_input_columns():
    assert generation.input_columns("alpaca") == Columns("instruction", "input", None)
    assert generation.input_columns("dolly") == Columns("instruction", "context", None)
    assert generation.input_columns("instruction=prompt,input=context") == Columns("prompt", "context", None)
    assert generation.input_columns("instruction=q,input=") == Columns("q", None, None)
    assert generation.input_columns("instruction=q,input=c,output=a") == Columns("q", "c", None)
    for bad in ("prompt", "input=context", "instruction=q,answer=a"):
        with pytest.raises(DataError):
            generation.input_columns(bad)


def test_check_refuses_bad_jobs_before_ray(tiny_model_dir, tmp_path):
    source = _write_jsonl(tmp_path / "in.jsonl", ROWS)
    ok = dict(model=tiny_model_dir, input=source, output=str(tmp_path / "o.jsonl"))
    generation.check(BatchConfig(**ok))
    bad = [
        (dict(input=str(tmp_path / "missing.jsonl")), "input not found"),
        (dict(model=str(tmp_path / "no-model")), "model directory not found"),
        (dict(output=str(tmp_path / "o.csv")), "output format"),
        (dict(max_new_tokens=5000), "no room"),
        (dict(temperature=0.0), "temperature"),
    ]
    for change, message in bad:
        with pytest.raises(ConfigError, match=message):
            generation.check(BatchConfig(**{**ok, **change}))


def _run_job(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "local"}
    return subprocess.run([sys.executable, JOB, *args], capture_output=True, text=True, timeout=120, env=env)


def test_help_lists_every_flag_with_its_default():
    done = _run_job("--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    for flag in (
        "--model", "--input", "--output", "--columns", "--num-actors", "--num-gpus-per-actor", "--batch-size",
        "--max-new-tokens", "--greedy", "--temperature", "--top-p", "--top-k", "--seed", "--trust-remote-code",
        "--allow-pickle",
    ):
        assert flag in text
    entries = re.split(r"\n  (?=-)", done.stdout.split("options:")[1])
    for entry in entries[1:]:  # [0] is empty, then -h, --config, then the flags
        assert entry.startswith(("-h", "--config")) or "(default:" in entry or "(required)" in entry, entry
    assert len(entries) >= 20
    assert "--top-p TOP_P nucleus sampling threshold (default: 0.92)" in text
    assert "--max-new-tokens MAX_NEW_TOKENS longest response, in tokens (default: 256)" in text


def test_missing_required_flags_are_named():
    done = _run_job("--input", "x.jsonl")
    assert done.returncode == 2 and done.stderr.strip() == "error: --model, --output required"


def test_bad_arguments_are_one_line_errors(tiny_model_dir, tmp_path):
    source = _write_jsonl(tmp_path / "in.jsonl", ROWS)
    for args, message in [
        (["--model", tiny_model_dir, "--input", str(tmp_path / "nope.jsonl")], "input not found"),
        (["--model", str(tmp_path / "nope"), "--input", source], "model directory not found"),
        (["--model", tiny_model_dir, "--input", source, "--num-actors", "0"], "must be at least 1"),
    ]:
        done = testing.run_job_here("batch_generate", [*args, "--output", str(tmp_path / "o.jsonl")])
        assert done.returncode == 2
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr


def test_actors_that_leave_no_cpu_for_reading_are_refused(ray_local):
    cpus = ray_local.cluster_resources()["CPU"]
    cluster.check_fits(generation.actor_request(1, cpus - 1, 0.0))  # one CPU stays for the read tasks
    with pytest.raises(ConfigError, match=rf"2 actors x {cpus:g} CPU = {2 * cpus:g} CPU, plus 1 CPU for Ray Data to read the input, but"):
        cluster.check_fits(generation.actor_request(2, cpus, 0.0))
    with pytest.raises(ConfigError, match=r"1 actor x 1 GPU = 1 GPU but this cluster has 0 GPU"):
        cluster.check_fits(generation.actor_request(1, 0.5, 1.0))


def test_the_job_fails_fast_when_its_actors_cannot_all_start(tiny_model_dir, tmp_path):
    """The job that used to wait for ever: more actor CPUs than the local Ray has."""
    source = _write_jsonl(tmp_path / "in.jsonl", ROWS)
    start = time.monotonic()
    done = _run_job("--model", tiny_model_dir, "--input", source, "--output", str(tmp_path / "o.jsonl"), "--num-actors", "64", "--num-cpus-per-actor", "1")
    assert done.returncode == 2 and time.monotonic() - start < 60
    [error] = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert error.startswith("error: 64 actors x 1 CPU = 64 CPU, plus 1 CPU for Ray Data to read the input, but this cluster has")
    assert error.endswith("or fewer actors (--num-actors)") and "--num-cpus-per-actor" in error
    assert not (tmp_path / "o.jsonl").exists()


# --- a job that dies, rerun ---------------------------------------------------------

KILLED_ROWS = 48
RESUME_FLAGS = ["--greedy", "--max-new-tokens", "12", "--batch-size", "2", "--rows-per-call", "2", "--rows-per-part", "4", "--num-cpus-per-actor", "1"]


def _from_flags(args):
    """The config the job builds from its command line."""
    parser = argparse.ArgumentParser()
    cli.add_config_flags(parser, BatchConfig)
    return cli.config_from_args(BatchConfig, parser.parse_args(args))


def _kill_after_first_part(args, output_dir, log, address):
    """Start the job as a driver of the Ray at ``address``, and SIGKILL it once its first
    part is committed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": address}
    with open(log, "w") as stderr:
        job = subprocess.Popen([sys.executable, JOB, *args], stdout=subprocess.DEVNULL, stderr=stderr, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (output_dir / "_progress" / "part-000000.json").exists():
            assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.01)
    finally:
        job.kill()  # SIGKILL, unless it already ended
    assert job.wait(timeout=30) == -signal.SIGKILL


def test_a_killed_job_reruns_to_every_row_once_answering_only_the_rows_not_written(ray_local, tiny_model_dir, generator, tmp_path):
    records = [{"instruction": f"Reverse the letters of the word {i}.", "input": "abc"[: i % 4], "id": i} for i in range(KILLED_ROWS)]
    records[5] = {"id": 5}  # a bad row keeps its error through the resume
    source, output_dir = tmp_path / "in.jsonl", tmp_path / "answers"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    args = ["--model", tiny_model_dir, "--input", str(source), "--output", str(output_dir), *RESUME_FLAGS]
    _kill_after_first_part(args, output_dir, tmp_path / "killed.log", ray_local.get_runtime_context().gcs_address)

    assert not (output_dir / "_SUCCESS").exists()
    committed = sorted(path.name for path in (output_dir / "_progress").glob("part-*.json"))
    written = sum(json.loads((output_dir / "_progress" / name).read_text())["rows"] for name in committed)
    kept = {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in output_dir.glob("part-*.jsonl") if f"{path.stem}.json" in committed}
    assert len(kept) == len(committed) >= 1 and 0 < written < KILLED_ROWS, (committed, written)

    summary = generation.run(_from_flags(args))  # the same command, rerun
    assert (summary["rows"], summary["errors"]) == (KILLED_ROWS, 1)
    assert (summary["rows_reused"], summary["rows_generated"]) == (written, KILLED_ROWS - written)
    for name, (mtime, data) in kept.items():  # the parts written before the kill, untouched
        assert ((output_dir / name).stat().st_mtime_ns, (output_dir / name).read_bytes()) == (mtime, data), name
    new_parts = sorted(set(os.listdir(output_dir)) - set(kept) - {"_SUCCESS", "_progress"})
    new_ids = [json.loads(line)["id"] for name in new_parts for line in (output_dir / name).read_text().splitlines()]
    assert new_ids == list(range(written, KILLED_ROWS))  # the rerun answered only the rows not written

    rows = list(output.read_rows(str(output_dir)))
    assert [row["id"] for row in rows] == list(range(KILLED_ROWS))  # every row once, in input order
    assert rows[5]["error"].startswith("missing_instruction") and rows[5]["response"] is None
    good = [r for r in records if "instruction" in r]
    answers = generator.generate([(r["instruction"], r["input"]) for r in good], GenerationParams(greedy=True, max_new_tokens=12))
    assert [row["response"] for row in rows if row["error"] is None] == [a.response for a in answers]

    again = generation.run(_from_flags(args))  # a finished output: nothing to answer
    assert (again["rows"], again["rows_reused"], again["rows_generated"]) == (KILLED_ROWS, KILLED_ROWS, 0)


def test_parquet_parts_resume_and_other_settings_are_refused_unless_restart(ray_local, tiny_model_dir, tmp_path):
    source = _write_jsonl(tmp_path / "in.jsonl", ROWS[:2])
    answers = tmp_path / "answers.parquet"
    config = BatchConfig(model=tiny_model_dir, input=source, output=str(answers), rows_per_part=2, **PARAMS)
    assert generation.run(config)["rows_generated"] == 3
    rows = list(output.read_rows(str(answers)))
    (answers / "_SUCCESS").unlink()
    (answers / "_progress" / "part-000001.json").unlink()  # as if the job died writing its second part
    resumed = generation.run(config)
    assert (resumed["rows"], resumed["rows_reused"], resumed["rows_generated"]) == (3, 2, 1)
    assert list(output.read_rows(str(answers))) == rows and pq.read_table(answers).num_rows == 3  # one schema

    for change, named in [
        (dict(max_new_tokens=7), "max_new_tokens: 6 -> 7"),
        (dict(greedy=False, seed=1), "greedy: true -> false; seed: null -> 1"),
        (dict(output_format="jsonl"), "output_format: 'parquet' -> 'jsonl'"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(f"holds 3 rows answered with other settings ({named}); pass another output, or --restart")):
            generation.run(dataclasses.replace(config, **change))

    def reopened(**change):
        again = dataclasses.replace(config, **change)
        return generation.prepare_output(again, RESULT_SCHEMA, generation.defining(again))

    assert reopened(batch_size=1, num_actors=2, rows_per_part=1).rows == 3  # how it runs may change
    assert reopened(max_new_tokens=7, restart=True).rows == 0 and not answers.exists()
    (tmp_path / "file.jsonl").write_text("{}\n")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("not ours")
    for where, message in [("file.jsonl", "is a file"), ("theirs", "holds files that are not a batch job's output")]:
        with pytest.raises(ConfigError, match=message):
            reopened(output=str(tmp_path / where), restart=True)
    assert (tmp_path / "theirs" / "notes.txt").exists()  # --restart deletes only what the job wrote


def test_a_row_whose_generation_fails_gets_an_error_and_the_others_their_answers(tiny_model_dir):
    generate = generation.Generate(BatchConfig(model=tiny_model_dir, input="", output="", **PARAMS), "cpu")
    answer = generate.generator.generate

    def fails_on_poison(prompts, params, **kwargs):
        if any(instruction == "poison" for instruction, _ in prompts):
            raise RuntimeError("cannot take this prompt")
        return answer(prompts, params, **kwargs)

    generate.generator.generate = fails_on_poison
    table = generation._requests("in.jsonl", [1, 2, 3], [{"instruction": "Say hi."}, {"instruction": "poison"}, {"input": "x"}], generation.input_columns("alpaca"), "jsonl", {})
    rows = generate(table).to_pylist()
    assert [row["__row"] for row in rows] == [1, 2, 3] and isinstance(rows[0]["response"], str) and rows[0]["error"] is None
    assert rows[1]["error"] == "generation_failed: RuntimeError: cannot take this prompt" and rows[1]["response"] is None
    assert rows[2]["error"].startswith("missing_instruction")


def test_rows_vllm_failed_on_get_an_error():
    """ray.data.llm's should_continue_on_error hands a failed row back as the engine saw
    it, past the job's postprocess; it leaves the processor as an error row."""
    import pyarrow as pa

    rows = [
        {"__record": "{}", "__source": "a", "__row": 1, "response": "hi", "finish_reason": "stop", "num_prompt_tokens": 3, "num_generated_tokens": 2, "truncated": False, "error": None, "__inference_error__": ""},
        {"__record": "{}", "__source": "a", "__row": 2, "__error": None, "truncated": False, "generated_tokens": [], "__inference_error__": "ValueError: too long"},
        {"__record": "{}", "__source": "a", "__row": 3, "__error": "missing_instruction: x", "__inference_error__": "ValueError: boom"},
    ]
    names = list(dict.fromkeys(name for row in rows for name in row))
    batch = pa.table({name: [row.get(name) for row in rows] for name in names})  # as Ray builds a block: missing values null
    rows = vllm_processor.with_inference_errors(batch).to_pylist()
    assert [row["error"] for row in rows] == [None, "generation_failed: ValueError: too long", "missing_instruction: x"]
    assert rows[0]["response"] == "hi" and rows[1]["response"] is None and rows[1]["truncated"] is None
    alone = vllm_processor.with_inference_errors(batch.slice(1, 1).drop_columns(["response", "finish_reason", "num_prompt_tokens", "num_generated_tokens", "error"]))
    assert alone.to_pylist()[0]["error"] == "generation_failed: ValueError: too long"
