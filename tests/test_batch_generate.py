"""The Ray Data batch-generation job: every input row out, bad rows flagged, JSONL and Parquet."""

import json
import os
import re
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from dolly_ray import cluster, testing
from dolly_ray.batch import generation
from dolly_ray.batch.config import BatchConfig
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
    output = tmp_path / "out" / "responses.jsonl"
    summary = generation.run(BatchConfig(model=tiny_model_dir, input=source, output=str(output), **PARAMS))
    rows_out = [json.loads(line) for line in output.read_text().splitlines()]
    _check(rows_out, expected)
    assert rows_out[3]["instruction"] == 42  # the original value, untouched
    assert rows_out[5]["original_response"] == "5"  # an input column named like a result is kept aside
    assert summary["rows"] == 9 and summary["errors"] == 6 and summary["output"] == str(output)
    assert summary["generated_tokens"] == sum(r.num_generated_tokens for r in expected.values())
    assert summary["tokens_per_s"] > 0
    assert not os.path.exists(str(output) + ".partial")


def test_column_mapping_and_parquet_out(ray_local, tiny_model_dir, tmp_path, expected):
    source = _write_jsonl(tmp_path / "in.jsonl", ROWS, rename={"instruction": "prompt", "input": "context"})
    output = tmp_path / "responses.parquet"
    summary = generation.run(
        BatchConfig(
            model=tiny_model_dir, input=source, output=str(output), columns="instruction=prompt,input=context", **PARAMS
        )
    )
    table = pq.read_table(output)
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

    def run(output):
        return generation.run(BatchConfig(model=tiny_model_dir, input=str(source), output=str(tmp_path / output), **PARAMS))

    summary = run("out.parquet")
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["id"] for r in rows] == [1, 2, 3, 4] and summary["errors"] == 2
    assert rows[0]["error"] is None and rows[3]["error"] is None and rows[3]["note"] == "a pair \U0001f600 is fine"
    assert rows[1]["error"].startswith("invalid_unicode: field 'note'") and "U+FFFD" in rows[1]["error"]
    assert rows[1]["response"] is None and rows[1]["note"] == "bad \ufffd here"
    assert rows[2]["error"].startswith("invalid_unicode: field 'instruction'") and rows[2]["instruction"] == "Say \ufffd hi."

    summary = run("out.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
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
    output = tmp_path / "out.data"
    summary = generation.run(
        BatchConfig(model=tiny_model_dir, input=str(tmp_path / "ds"), output=str(output), output_format="jsonl", **PARAMS)
    )
    rows_out = [json.loads(line) for line in output.read_text().splitlines()]
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
