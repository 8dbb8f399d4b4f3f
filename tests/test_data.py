"""The Ray Data record pipeline: sources, column mapping, validation, label masking, split."""

import functools
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ray.data.expressions import col

from dolly_ray import prompts, testing
from dolly_ray.records import sources
from dolly_ray.train import data
from dolly_ray.train.labels import IGNORE_INDEX


def _prepare(source, model_dir, **config):
    return data.PreparedData(data.DataConfig(source=str(source), **config), model_dir)


def _rows(prepared):
    """(instruction-independent) training rows, in a stable order for comparison."""
    rows = prepared.records.filter(expr=col("skip_reason") == "").take_all()
    return sorted((tuple(r["input_ids"]), tuple(r["labels"]), r["is_eval"]) for r in rows)


def test_labels_cover_only_response_and_end_key(ray_local, tiny_model_dir, tmp_path):
    records = [
        {"instruction": "Reverse the letters of the word.", "input": "abc", "output": "cba"},
        {"instruction": "What is 2 plus 3?", "input": "", "output": "5"},
    ]
    path = tmp_path / "two.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = sorted(_prepare(path, tiny_model_dir, eval_fraction=0.0).train.take_all(), key=lambda r: r["num_tokens"])
    tokenizer = prompts.load_tokenizer(tiny_model_dir)
    ids = prompts.add_special_tokens(tokenizer)
    for row, record in zip(sorted(rows, key=lambda r: -r["num_tokens"]), records, strict=True):
        input_ids, labels = list(row["input_ids"]), list(row["labels"])
        expected = tokenizer(prompts.format_training_text(record["instruction"], record["output"], record["input"]))["input_ids"]
        assert input_ids == expected and row["num_tokens"] == len(expected)
        response_at = input_ids.index(ids.response)
        assert labels[: response_at + 1] == [IGNORE_INDEX] * (response_at + 1)
        assert labels[response_at + 1 :] == input_ids[response_at + 1 :]
        assert labels[-1] == ids.end
        assert tokenizer.decode(labels[response_at + 1 :]) == f"\n{record['output']}\n\n{prompts.END_KEY}"


def test_too_long_row_is_skipped_not_truncated(ray_local, tiny_model_dir, tmp_path):
    path = tmp_path / "long.jsonl"
    short = {"instruction": "Say hi.", "input": "", "output": "hi"}
    long = {"instruction": "Say hi.", "input": "x " * 200, "output": "hi"}
    path.write_text(json.dumps(short) + "\n" + json.dumps(long) + "\n")
    prepared = _prepare(path, tiny_model_dir, max_length=96, eval_fraction=0.0)
    report = prepared.report()
    assert report.skipped == {"too_long": 1}
    assert report.train_rows == 1
    assert "row 2" in report.first_skip["too_long"] and "> max_length 96" in report.first_skip["too_long"]
    (row,) = prepared.train.take_all()
    assert any(label != IGNORE_INDEX for label in row["labels"])


def _write_all_formats(records, tmp_path):
    json_path = tmp_path / "records.json"
    json_path.write_text(json.dumps(records))
    jsonl_path = tmp_path / "records.jsonl"
    jsonl_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    parquet_path = tmp_path / "records.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet_path)
    saved_path = tmp_path / "saved"
    datasets.Dataset.from_list(records).save_to_disk(str(saved_path))
    return [json_path, jsonl_path, parquet_path, saved_path]


def test_every_format_gives_identical_rows(ray_local, tiny_model_dir, tmp_path, task_records):
    records = [{k: r[k] for k in ("instruction", "input", "output")} for r in task_records]
    rows_by_format = [_rows(_prepare(path, tiny_model_dir, eval_fraction=0.3)) for path in _write_all_formats(records, tmp_path)]
    assert len(rows_by_format[0]) == len(records)
    assert any(is_eval for *_, is_eval in rows_by_format[0]) and not all(is_eval for *_, is_eval in rows_by_format[0])
    for rows in rows_by_format[1:]:
        assert rows == rows_by_format[0]


def test_hub_style_dataset_loads_through_load_dataset(ray_local, tiny_model_dir, tmp_path, task_records):
    """The hub-id path (datasets.load_dataset) on a local dataset repository."""
    repo = tmp_path / "owner_alpaca"
    (repo / "data").mkdir(parents=True)
    records = [{k: r[k] for k in ("instruction", "input", "output")} for r in task_records]
    pq.write_table(pa.Table.from_pylist(records), repo / "data" / "train-00000-of-00001.parquet")
    config = data.DataConfig(source=str(repo), eval_fraction=0.3)
    to_table = functools.partial(sources.validated_table, columns=sources.parse_columns("alpaca"))
    from_hub = data.PreparedData(config, tiny_model_dir, records=sources.read_raw(str(repo), "train", to_table, use_datasets=True))
    from_file = _prepare(_write_all_formats(records, tmp_path)[1], tiny_model_dir, eval_fraction=0.3)
    assert _rows(from_hub) == _rows(from_file)
    assert from_hub.records.take(1)[0]["source"] == str(repo)


def test_dolly_and_custom_column_mappings(ray_local, tiny_model_dir, tmp_path):
    dolly = [{"instruction": "Say hi.", "context": "to Ray", "response": "hi Ray", "category": "open_qa"}]
    custom = [{"prompt": "Say hi.", "extra": "to Ray", "answer": "hi Ray"}]
    alpaca = [{"instruction": "Say hi.", "input": "to Ray", "output": "hi Ray"}]
    for name, records in (("dolly", dolly), ("custom", custom), ("alpaca", alpaca)):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(records[0]) + "\n")
    expected = _rows(_prepare(tmp_path / "alpaca.jsonl", tiny_model_dir))
    assert _rows(_prepare(tmp_path / "dolly.jsonl", tiny_model_dir, columns="dolly")) == expected
    assert _rows(_prepare(tmp_path / "custom.jsonl", tiny_model_dir, columns="instruction=prompt,input=extra,output=answer")) == expected


def test_parse_columns_errors():
    assert sources.parse_columns("instruction=q,output=a") == sources.Columns("q", "input", "a")
    assert sources.parse_columns("instruction=q,input=,output=a").input is None
    with pytest.raises(sources.DataError, match="unknown column schema 'vicuna'"):
        sources.parse_columns("vicuna")
    with pytest.raises(sources.DataError, match="unknown column role 'answer'"):
        sources.parse_columns("instruction=q,answer=a")
    with pytest.raises(sources.DataError, match="must name both"):
        sources.parse_columns("instruction=q")


BAD_LINES = {
    "missing_instruction": '{"output": "x"}',
    "null_instruction": '{"instruction": null, "output": "x"}',
    "non_string_instruction": '{"instruction": 7, "output": "x"}',
    "empty_instruction": '{"instruction": "  ", "output": "x"}',
    "missing_output": '{"instruction": "x"}',
    "null_output": '{"instruction": "x", "output": null}',
    "non_string_output": '{"instruction": "x", "output": ["a"]}',
    "empty_output": '{"instruction": "x", "output": ""}',
    "non_string_input": '{"instruction": "x", "input": 3.5, "output": "y"}',
    "prompt_key_in_output": '{"instruction": "x", "output": "y ### End z"}',
    "not_an_object": '["instruction", "output"]',
    "malformed_json": '{"instruction": "x", "output": ',
}


def test_bad_records_are_counted_by_reason(ray_local, tiny_model_dir, tmp_path):
    good = '{"instruction": "Say hi.", "input": null, "output": "hi"}'
    lines = [good] + [line for line in BAD_LINES.values() for _ in range(2)] + [good]
    path = tmp_path / "bad.jsonl"
    path.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe not utf-8\n")
    report = _prepare(path, tiny_model_dir, eval_fraction=0.0).report()
    assert report.skipped == {**{reason: 2 for reason in BAD_LINES}, "invalid_utf8": 1}
    assert report.total == len(lines) + 1 and report.train_rows == 2
    assert report.first_skip["null_output"] == f"{path} row 12: field 'output' is null"
    assert "row 27" in report.first_skip["invalid_utf8"]


def test_strict_mode_names_row_and_field(ray_local, tiny_model_dir, tmp_path):
    path = tmp_path / "strict.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 5}\n')
    with pytest.raises(sources.DataError, match=r"strict.jsonl row 3: field 'output' is of type int, not a string"):
        _prepare(path, tiny_model_dir, strict=True).report()
    records = [{"instruction": "a", "output": "b"}, {"instruction": None, "output": "b"}]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "strict.parquet")
    with pytest.raises(sources.DataError, match=r"strict.parquet row 2: field 'instruction' is null"):
        _prepare(tmp_path / "strict.parquet", tiny_model_dir, strict=True).report()


def test_no_usable_records_hints_at_the_column_mapping(ray_local, tiny_model_dir, tmp_path):
    path = tmp_path / "dolly.jsonl"
    path.write_text('{"instruction": "a", "context": "", "response": "b"}\n')
    with pytest.raises(sources.DataError, match="no usable training records.*missing_output=1.*column mapping"):
        _prepare(path, tiny_model_dir).report()


def test_unreadable_sources_give_clear_errors(ray_local, tiny_model_dir, tmp_path):
    (tmp_path / "records.csv").write_text("instruction,output\na,b\n")
    with pytest.raises(sources.DataError, match=r"unsupported file type '\.csv'"):
        _prepare(tmp_path / "records.csv", tiny_model_dir)
    with pytest.raises(sources.DataError, match="cannot read"):
        _prepare(tmp_path / "absent.jsonl", tiny_model_dir)
    (tmp_path / "broken.json").write_text('[{"instruction": "a", "output": "b"},')
    with pytest.raises(sources.DataError, match="broken.json: not a valid JSON array"):
        _prepare(tmp_path / "broken.json", tiny_model_dir).report()
    with pytest.raises(sources.DataError, match="cannot load dataset 'no-such-owner/no-such-dataset'"):
        _prepare("no-such-owner/no-such-dataset", tiny_model_dir)


def test_split_is_deterministic_by_seed(ray_local, tiny_model_dir, tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": str(i)}) + "\n" for i in range(200)))
    first = _rows(_prepare(path, tiny_model_dir, eval_fraction=0.25, seed=1))
    again = _rows(_prepare(path, tiny_model_dir, eval_fraction=0.25, seed=1))
    other = _rows(_prepare(path, tiny_model_dir, eval_fraction=0.25, seed=2))
    num_eval = sum(is_eval for *_, is_eval in first)
    assert first == again and len(first) == 200 and 25 <= num_eval <= 75
    assert other != first


def test_shared_alpaca_eval_records(ray_local, tmp_path, shared_records_path):
    """805 real records at realistic lengths through the whole pipeline.

    A tokenizer trained on English (here: these records) compresses about as well as
    GPT-J's, so nothing is too long at 2048; the two records whose output is empty are
    the only skips.
    """
    with open(shared_records_path) as f:
        corpus = testing.english_corpus(json.load(f))
    model_dir = tmp_path / "english"
    testing.build_tokenizer(model_dir, vocab_size=8000, corpus=corpus)
    report = _prepare(shared_records_path, str(model_dir), max_length=2048).report()
    assert report.total == 805
    assert report.skipped == {"empty_output": 2}
    assert report.train_rows + report.eval_rows == 803
    lengths = report.token_lengths
    assert 0 < lengths["min"] < lengths["median"] < lengths["p95"] <= lengths["max"] <= 2048
