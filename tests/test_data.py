"""The Ray Data record pipeline: sources, column mapping, validation, label masking, split,
and the prepared rows that runs reuse."""

import functools
import json
import os

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dolly_ray import prompts, testing
from dolly_ray.records import sources, tasks
from dolly_ray.train import data, prepared
from dolly_ray.train.labels import IGNORE_INDEX


def _prepare(source, model_dir, storage=None, **config):
    """Unpacked rows (one per record) unless ``pack=True``, kept under ``storage`` (by
    default beside the source)."""
    config.setdefault("pack", False)
    storage = storage or os.path.join(os.path.dirname(str(source)), "prepared")
    return prepared.prepare(data.DataConfig(source=str(source), **config), str(model_dir), str(storage))


def _split_rows(done, split):
    rows = prepared.WorkerRows(done.for_workers(), split, 0, 1)
    return rows.read(0, rows.num_rows)


def _rows(done):
    """(instruction-independent) training rows, in a stable order for comparison."""
    rows = []
    for split in ("train", "eval"):
        if not done.rows(split):
            continue
        columns = _split_rows(done, split)
        rows += [(tuple(ids), tuple(labels), split == "eval") for ids, labels in zip(columns["input_ids"], columns["labels"])]
    return sorted(rows)


def test_labels_cover_only_response_and_end_key(ray_local, tiny_model_dir, tmp_path):
    records = [
        {"instruction": "Reverse the letters of the word.", "input": "abc", "output": "cba"},
        {"instruction": "What is 2 plus 3?", "input": "", "output": "5"},
    ]
    path = tmp_path / "two.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = _split_rows(_prepare(path, tiny_model_dir, eval_fraction=0.0), "train")
    tokenizer = prompts.load_tokenizer(tiny_model_dir)
    ids = prompts.add_special_tokens(tokenizer)
    for input_ids, labels, num_tokens, record in zip(rows["input_ids"], rows["labels"], rows["num_tokens"], records, strict=True):
        input_ids, labels = input_ids.tolist(), labels.tolist()
        expected = tokenizer(prompts.format_training_text(record["instruction"], record["output"], record["input"]))["input_ids"]
        assert input_ids == expected and num_tokens == len(expected)
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
    done = _prepare(path, tiny_model_dir, max_length=96, eval_fraction=0.0)
    report = done.report
    assert report.skipped == {"too_long": 1}
    assert report.train_rows == 1
    assert "row 2" in report.first_skip["too_long"] and "> max_length 96" in report.first_skip["too_long"]
    (labels,) = _split_rows(done, "train")["labels"]
    assert any(label != IGNORE_INDEX for label in labels)


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
    config = data.DataConfig(source=str(repo), eval_fraction=0.3, pack=False)
    to_table = functools.partial(sources.validated_table, columns=sources.parse_columns("alpaca"))
    loaded = sources.read_raw(str(repo), "train", to_table, use_datasets=True)
    assert loaded.take(1)[0]["source"] == str(repo)
    from_hub = prepared.prepare(config, tiny_model_dir, str(tmp_path / "prepared"), records=loaded)
    from_file = _prepare(_write_all_formats(records, tmp_path)[1], tiny_model_dir, eval_fraction=0.3)
    assert _rows(from_hub) == _rows(from_file)


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
    report = _prepare(path, tiny_model_dir, eval_fraction=0.0).report
    assert report.skipped == {**{reason: 2 for reason in BAD_LINES}, "invalid_utf8": 1}
    assert report.total == len(lines) + 1 and report.train_rows == 2
    assert report.first_skip["null_output"] == f"{path} row 12: field 'output' is null"
    assert "row 27" in report.first_skip["invalid_utf8"]


def test_strict_mode_names_row_and_field(ray_local, tiny_model_dir, tmp_path):
    path = tmp_path / "strict.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 5}\n')
    with pytest.raises(sources.DataError, match=r"strict.jsonl row 3: field 'output' is of type int, not a string"):
        _prepare(path, tiny_model_dir, strict=True)
    records = [{"instruction": "a", "output": "b"}, {"instruction": None, "output": "b"}]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "strict.parquet")
    with pytest.raises(sources.DataError, match=r"strict.parquet row 2: field 'instruction' is null"):
        _prepare(tmp_path / "strict.parquet", tiny_model_dir, strict=True)


def test_no_usable_records_hints_at_the_column_mapping(ray_local, tiny_model_dir, tmp_path):
    path = tmp_path / "dolly.jsonl"
    path.write_text('{"instruction": "a", "context": "", "response": "b"}\n')
    with pytest.raises(sources.DataError, match="no usable training records.*missing_output=1.*column mapping"):
        _prepare(path, tiny_model_dir)


def test_unreadable_sources_give_clear_errors(ray_local, tiny_model_dir, tmp_path):
    (tmp_path / "records.csv").write_text("instruction,output\na,b\n")
    with pytest.raises(sources.DataError, match=r"unsupported file type '\.csv'"):
        _prepare(tmp_path / "records.csv", tiny_model_dir)
    with pytest.raises(sources.DataError, match="cannot read"):
        _prepare(tmp_path / "absent.jsonl", tiny_model_dir)
    (tmp_path / "broken.json").write_text('[{"instruction": "a", "output": "b"},')
    with pytest.raises(sources.DataError, match="broken.json: not a valid JSON array"):
        _prepare(tmp_path / "broken.json", tiny_model_dir)
    with pytest.raises(sources.DataError, match="cannot load dataset 'no-such-owner/no-such-dataset'"):
        _prepare("no-such-owner/no-such-dataset", tiny_model_dir)


def test_split_is_deterministic_by_seed(ray_local, tiny_model_dir, tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": str(i)}) + "\n" for i in range(200)))
    first = _rows(_prepare(path, tiny_model_dir, eval_fraction=0.25, seed=1))
    again = _rows(_prepare(path, tiny_model_dir, tmp_path / "elsewhere", eval_fraction=0.25, seed=1))  # prepared anew
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
    report = _prepare(shared_records_path, str(model_dir), tmp_path / "prepared", max_length=2048).report
    assert report.total == 805
    assert report.skipped == {"empty_output": 2}
    assert report.train_rows + report.eval_rows == 803
    lengths = report.token_lengths
    assert 0 < lengths["min"] < lengths["median"] < lengths["p95"] <= lengths["max"] <= 2048


def _task_file(path, n=300, seed=0):
    return tasks.write_jsonl(tasks.generate(n, seed=seed), path)


def test_prepared_rows_are_reused_and_other_settings_are_prepared_anew(ray_local, tiny_model_dir, tmp_path, monkeypatch):
    path = _task_file(tmp_path / "tasks.jsonl")
    first = _prepare(path, tiny_model_dir, pack=True, eval_fraction=0.1)
    assert not first.reused and first.rows("train") < first.report.train_rows  # packed: several records a row
    parts = sorted(p.name for p in (tmp_path / "prepared" / prepared.PREPARED_DIR / first.key / prepared.PARTS_DIR).iterdir())

    def no_preparation(*args, **kwargs):
        raise AssertionError("the rows were prepared again")

    monkeypatch.setattr(prepared, "_build", no_preparation)  # no read, no tokenization: only the manifest
    again = _prepare(path, tiny_model_dir, pack=True, eval_fraction=0.1)
    assert again.reused and (again.key, again.location, again.parts, again.report) == (first.key, first.location, first.parts, first.report)
    assert again.heldout(5) == first.heldout(5)
    assert sorted(p.name for p in (tmp_path / "prepared" / prepared.PREPARED_DIR / first.key / prepared.PARTS_DIR).iterdir()) == parts
    for changed in ({"max_length": 100}, {"seed": 1}, {"pack": False}, {"eval_fraction": 0.2}):
        with pytest.raises(AssertionError, match="prepared again"):
            _prepare(path, tiny_model_dir, **{"pack": True, "eval_fraction": 0.1, **changed})
    _task_file(path, seed=1)  # other records in the same file
    with pytest.raises(AssertionError, match="prepared again"):
        _prepare(path, tiny_model_dir, pack=True, eval_fraction=0.1)


def test_an_interrupted_preparation_is_prepared_anew(ray_local, tiny_model_dir, tmp_path):
    path = _task_file(tmp_path / "tasks.jsonl")
    first = _prepare(path, tiny_model_dir)
    rows = _rows(first)
    os.remove(os.path.join(first.location, prepared.MANIFEST_FILE))  # as if killed before the end
    again = _prepare(path, tiny_model_dir)
    assert not again.reused and again.report == first.report and _rows(again) == rows
    kept = {p.name for p in (tmp_path / "prepared" / prepared.PREPARED_DIR / first.key / prepared.PARTS_DIR).iterdir()}
    assert kept == {part.path for split in prepared.SPLITS for part in again.parts[split]}  # the old parts are gone


def test_strict_mode_on_reused_rows_still_names_the_first_bad_record(ray_local, tiny_model_dir, tmp_path, monkeypatch):
    path = tmp_path / "some_bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": null}\n{"instruction": "c", "output": 5}\n')
    assert _prepare(path, tiny_model_dir).report.skipped == {"null_output": 1, "non_string_output": 1}
    monkeypatch.setattr(prepared, "_build", None)
    with pytest.raises(sources.DataError, match=r"invalid record \(null_output\) in .*some_bad.jsonl row 2: field 'output' is null"):
        _prepare(path, tiny_model_dir, strict=True)


def test_packed_parts_hold_every_usable_record_once(ray_local, tiny_model_dir, tmp_path):
    path = _task_file(tmp_path / "tasks.jsonl", n=2000)
    unpacked, packed = _prepare(path, tiny_model_dir, eval_fraction=0.1), _prepare(path, tiny_model_dir, eval_fraction=0.1, pack=True)
    for split in ("train", "eval"):
        rows, records = _split_rows(packed, split), _split_rows(unpacked, split)
        assert sum(len(lengths) for lengths in rows["lengths"]) == len(records["input_ids"])
        assert all(len(ids) == sum(lengths) <= 1024 for ids, lengths in zip(rows["input_ids"], rows["lengths"]))
        # Cut back into records, the packed rows hold the same ids and labels.
        cut = sorted(
            (tuple(ids[start : start + n]), tuple(labels[start : start + n]))
            for ids, labels, lengths in zip(rows["input_ids"], rows["labels"], rows["lengths"])
            for start, n in zip(np.cumsum([0, *lengths[:-1]]), lengths)
        )
        assert cut == sorted((tuple(ids), tuple(labels)) for ids, labels in zip(records["input_ids"], records["labels"]))
        assert packed.tokens(split) == unpacked.tokens(split)


def test_parts_are_read_by_position_across_files_and_row_groups(tmp_path):
    """A worker's range may start and end inside any part and row group."""
    sizes, start = [7, 1, 12, 5], 0
    for index, size in enumerate(sizes):
        (tmp_path / prepared.PARTS_DIR).mkdir(exist_ok=True)
        pq.write_table(pa.table({"n": np.arange(start, start + size)}), tmp_path / prepared.PARTS_DIR / f"{index}.parquet", row_group_size=3)
        start += size
    reader = prepared.PartsReader(str(tmp_path), [prepared.Part(f"{i}.parquet", size, 0) for i, size in enumerate(sizes)])
    assert reader.num_rows == 25
    for first in range(25):
        for stop in range(first + 1, 26):
            assert reader.read(first, stop)["n"].to_pylist() == list(range(first, stop))


def test_workers_get_equal_disjoint_row_ranges(ray_local, tiny_model_dir, tmp_path):
    path = _task_file(tmp_path / "tasks.jsonl", n=301)
    done = _prepare(path, tiny_model_dir, eval_fraction=0.0)
    shares = [prepared.WorkerRows(done.for_workers(), "train", rank, 3) for rank in range(3)]
    assert [rows.num_rows for rows in shares] == [100] * 3  # 301 // 3: the last row is left out
    ids = [tuple(row) for rows in shares for row in rows.read(0, rows.num_rows)["input_ids"]]
    assert ids == [tuple(row) for row in _split_rows(done, "train")["input_ids"][:300]]
