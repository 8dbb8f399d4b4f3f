"""Hostile datasets (dolly_ray.records.fuzz) through the data pipeline, training and the batch job."""

import collections
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dolly_ray import testing
from dolly_ray.batch import generation, output
from dolly_ray.batch.config import BatchConfig
from dolly_ray.records import fuzz, sources, tasks
from dolly_ray.train import checkpoint, data, prepared, recipe


def _good(n, seed=3):
    return [{k: r[k] for k in ("instruction", "input", "output")} for r in tasks.generate(n, seed=seed)]


def _prepare(path, model_dir, **config):
    return prepared.prepare(data.DataConfig(source=str(path), **config), model_dir, str(path.parent / "prepared"))


def _usable(lines):
    return [json.loads(case.line.decode("utf-8-sig")) for case in lines if not case.skip_reason]


def test_every_kind_of_hostile_line_is_counted_by_reason(ray_local, tiny_model_dir, tmp_path):
    path = tmp_path / "hostile.jsonl"
    lines = fuzz.write_mixed_jsonl(path, _good(40), seed=1)
    assert {case.kind for case in lines} >= {case.kind for case in fuzz.cases(0)}  # every kind is in the file
    report = _prepare(path, tiny_model_dir, max_length=256, eval_fraction=0.0).report

    expected = collections.Counter(case.skip_reason for case in lines if case.skip_reason)
    assert report.skipped == dict(expected)
    assert report.total == len(lines)  # one row per line: nothing split, nothing lost
    assert report.train_rows == len(lines) - sum(expected.values()) == len(_usable(lines))
    for reason in expected:  # the first of each kind is reported at its own line number
        first_line = next(number for number, case in enumerate(lines, start=1) if case.skip_reason == reason)
        assert report.first_skip[reason].startswith(f"{path} row {first_line}: "), (reason, report.first_skip[reason])


def test_strict_mode_stops_at_the_first_hostile_line(ray_local, tiny_model_dir, tmp_path):
    path = tmp_path / "hostile.jsonl"
    lines = fuzz.write_mixed_jsonl(path, _good(10), seed=2, long_chars=10_000)
    first = next(number for number, case in enumerate(lines, start=1) if case.skip_reason)
    with pytest.raises(sources.DataError, match=rf"invalid record \({lines[first - 1].skip_reason}\) in .*hostile.jsonl row {first}: "):
        _prepare(path, tiny_model_dir, max_length=256, strict=True)


WRONG_EXTENSIONS = {
    "records.txt": r"records.txt: unsupported file type '\.txt'",
    "parquet.json": r"parquet.json: holds Parquet data, not JSON; rename it to \.parquet",
    "json.parquet": r"json.parquet: not a readable Parquet file",
}


@pytest.mark.parametrize("name", sorted(WRONG_EXTENSIONS))
def test_wrong_file_extension_gives_a_clear_error(ray_local, tiny_model_dir, tmp_path, name):
    """One case per test: a failed pipeline's actors stay alive while the test's
    captured logs hold Ray's traceback, and would starve a second job in the same test."""
    records = _good(3)
    writers = {
        "records.txt": lambda path: path.write_text("".join(json.dumps(r) + "\n" for r in records)),
        "parquet.json": lambda path: pq.write_table(pa.Table.from_pylist(records), path),
        "json.parquet": lambda path: path.write_text(json.dumps(records)),
    }
    writers[name](tmp_path / name)
    with pytest.raises(sources.DataError, match=WRONG_EXTENSIONS[name]):
        _prepare(tmp_path / name, tiny_model_dir)


def test_batch_job_refuses_an_unsupported_file_type(tiny_model_dir, tmp_path):
    # The batch job reads with the same reader (sources.read_raw), so it gives the same errors.
    (tmp_path / "records.txt").write_text("".join(json.dumps(r) + "\n" for r in _good(3)))
    config = BatchConfig(model=tiny_model_dir, input=str(tmp_path / "records.txt"), output=str(tmp_path / "out.jsonl"))
    with pytest.raises(sources.DataError, match=WRONG_EXTENSIONS["records.txt"]):
        generation.run(config)
    assert not (tmp_path / "out.jsonl").exists()


def test_batch_job_answers_or_flags_every_hostile_row(ray_local, tiny_model_dir, tmp_path):
    path = tmp_path / "hostile.jsonl"
    lines = fuzz.write_mixed_jsonl(path, _good(len(fuzz.cases(0))), seed=3)
    config = BatchConfig(
        model=tiny_model_dir,
        input=str(path),
        output=str(tmp_path / "out.jsonl"),
        greedy=True,
        max_new_tokens=4,
        batch_size=8,
        num_cpus_per_actor=0.5,
    )
    summary = generation.run(config)
    rows = list(output.read_rows(str(tmp_path / "out.jsonl")))
    assert summary["rows"] == len(rows) == len(lines)
    assert summary["errors"] == sum(case.batch_error is not None for case in lines)
    for row, case in zip(rows, lines, strict=True):
        if case.batch_error is None:
            assert row["error"] is None and isinstance(row["response"], str), (case.kind, row)
        else:
            assert row["error"].startswith(case.batch_error + ":"), (case.kind, row["error"])
            assert row["response"] is None
    by_kind = {case.kind: row for row, case in zip(rows, lines, strict=True)}
    assert by_kind["long_instruction"]["truncated"] is True  # cut from the left to fit, still answered
    assert by_kind["lone_surrogate_in_other_field"]["id"] == "\udfff"  # written back as the escape it was


@pytest.mark.slow
def test_training_on_a_half_hostile_file_uses_exactly_the_good_half(ray_local, tiny_model_dir, tmp_path):
    """Also the run of ``group`` batching under Ray Train + ZeRO-3 (pack is the reference
    run's and every family's, pad the demo's)."""
    path = tmp_path / "hostile.jsonl"
    lines = fuzz.write_mixed_jsonl(path, _good(120), seed=4)
    config = testing.cpu_train_config(
        tiny_model_dir, path, tmp_path / "runs", "hostile", epochs=2, micro_batch_size=8, batching="group", learning_rate=6e-3, warmup_steps=1,
        log_every=1, checkpoint_every=0,
    )  # fmt: skip
    summary = recipe.run(config)
    history = checkpoint.read_history(summary["checkpoint"])
    assert [row["step"] for row in history] == list(range(1, summary["steps"] + 1))
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"], [row["train_loss"] for row in history]
    usable = _usable(lines)
    in_eval = [data.in_eval_split(r["instruction"], r.get("input") or "", r["output"], config.seed, config.eval_fraction) for r in usable]
    assert summary["finished"] is True
    assert summary["train_records"] == in_eval.count(False) and summary["eval_records"] == in_eval.count(True)
    assert summary["skipped_records"] == dict(collections.Counter(case.skip_reason for case in lines if case.skip_reason))
