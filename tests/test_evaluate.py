"""Scoring answers: the figures, the evaluation job over a dataset, and its command line."""

import json
import os
import subprocess
import sys

import pytest

from dolly_ray import testing
from dolly_ray.batch import evaluate, output
from dolly_ray.generate import scoring
from dolly_ray.generate.generator import GenerationParams
from dolly_ray.records import tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GREEDY = GenerationParams(greedy=True, max_new_tokens=8)


def _rouge_l(reference: str, response: str) -> float:
    """ROUGE-L F-measure by hand: the longest common subsequence of lowercased words."""
    ref, res = reference.lower().split(), response.lower().split()
    lcs = [[0] * (len(res) + 1) for _ in range(len(ref) + 1)]
    for i, a in enumerate(ref):
        for j, b in enumerate(res):
            lcs[i + 1][j + 1] = lcs[i][j] + 1 if a == b else max(lcs[i][j + 1], lcs[i + 1][j])
    common = lcs[-1][-1]
    if not common:
        return 0.0
    precision, recall = common / len(res), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def test_scores_equal_a_direct_computation():
    pairs = [
        ("the cat sat on the mat", "the cat sat on the mat", "stop"),
        ("the cat sat on the mat", "  the cat sat on the mat\n", "length"),
        ("the cat sat on the mat", "a cat on a mat", "stop"),
        ("red green blue", "blue green red", "length"),
        ("one two", "three", "stop"),
    ]
    scored = [scoring.score(response, reference, reason) for reference, response, reason in pairs]
    assert [s.exact_match for s in scored] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert [s.stopped_at_end for s in scored] == [1.0, 0.0, 1.0, 0.0, 1.0]
    for s, (reference, response, _) in zip(scored, pairs, strict=True):
        assert s.rouge_l == pytest.approx(_rouge_l(reference, response))
    assert scoring.means(scored) == pytest.approx({"exact_match": 0.4, "rouge_l": sum(s.rouge_l for s in scored) / 5, "stopped_at_end": 0.6})
    assert scoring.exact_match(["a", " b\n", "c"], ["a", "b", "d"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        scoring.exact_match(["a"], [])


def _records_with_known_answers(generator, count=12):
    """Task records whose references are the model's own greedy answer (every third one),
    that answer with words added, or unrelated text: exact matches, partial overlaps and misses."""
    records = tasks.generate(count, seed=4, tasks=["reverse_word", "sort_numbers", "first_letter"])
    answers = generator.generate([(r["instruction"], r["input"]) for r in records], GREEDY)
    for i, (record, answer) in enumerate(zip(records, answers, strict=True)):
        record["output"] = [answer.response, f"{answer.response} and more words", "nothing alike"][i % 3]
    return records, answers


@pytest.mark.slow
def test_evaluation_scores_every_task_and_counts_what_it_cannot_score(ray_local, tiny_model_dir, generator, tmp_path):
    records, answers = _records_with_known_answers(generator)
    bad = [{"input": "no instruction", "output": "x", "task": "reverse_word"}, {"instruction": "Say hi.", "task": "x"}, {"instruction": "Say hi.", "output": 7}]
    dataset = tmp_path / "eval.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in records[:5] + bad + records[5:]))
    answers_dir = tmp_path / "answers"
    config = evaluate.EvalConfig(
        model=tiny_model_dir, dataset=str(dataset), answers=str(answers_dir), max_new_tokens=GREEDY.max_new_tokens, batch_size=4, num_actors=1, num_cpus_per_actor=1, rows_per_part=4
    )
    summary = evaluate.run(config)
    scored = [scoring.score(a.response, r["output"], a.finish_reason) for r, a in zip(records, answers, strict=True)]
    by_task: dict[str, list] = {}
    for record, s in zip(records, scored, strict=True):
        by_task.setdefault(record["task"], []).append(s)
    assert summary["records"] == 15 and summary["scored"] == 12
    assert summary["skipped"] == {"missing_instruction": 1, "missing_reference": 1, "non_string_reference": 1}
    assert list(summary["per_task"]) == sorted(by_task)
    for task, group in by_task.items():
        figures = summary["per_task"][task]
        assert figures["records"] == len(group)
        assert {k: figures[k] for k in scoring.FIGURES} == pytest.approx(scoring.means(group), abs=1e-4)
    assert {k: summary[k] for k in scoring.FIGURES} == pytest.approx(scoring.means(scored), abs=1e-4)
    assert 0 < summary["exact_match"] < 1 and 0 < summary["rouge_l"] < 1  # the figures are not trivially 0 or 1
    rows = list(output.read_rows(str(answers_dir)))
    assert len(rows) == 15 and [r.get("output") for r in rows[:5]] == [r["output"] for r in records[:5]]
    assert [r["exact_match"] for r in rows if not r["eval_skip"]] == [s.exact_match for s in scored]
    assert [r["eval_skip"] for r in rows[5:8]] == ["missing_instruction", "missing_reference", "non_string_reference"]

    # What a job killed while writing its third part of four leaves: two parts committed,
    # the third half written. The rerun answers the 7 records after them, and its figures
    # are the whole dataset's.
    (answers_dir / "_SUCCESS").unlink()
    for number in (2, 3):
        (answers_dir / "_progress" / f"part-00000{number}.json").unlink()
    (answers_dir / "part-000003.jsonl").unlink()
    (answers_dir / "part-000002.jsonl").write_text((answers_dir / "part-000002.jsonl").read_text()[:50])
    resumed = evaluate.run(config)
    assert (resumed["rows_reused"], resumed["rows_generated"]) == (8, 7)
    same = [k for k in summary if not k.startswith(("rows_", "seconds"))]
    assert {k: resumed[k] for k in same} == {k: summary[k] for k in same}  # figures rounded to 4 places
    assert list(output.read_rows(str(answers_dir))) == rows


@pytest.mark.slow
def test_the_job_prints_figures_per_task_and_the_summary_last(tiny_model_dir, generator, tmp_path):
    """The Dolly schema (reference in ``response``, task in ``category``) through jobs/evaluate.py."""
    script = os.path.join(ROOT, "jobs", "evaluate.py")
    help_text = testing.run_job_here("evaluate", ["--help"]).stdout
    for flag in ("--model", "--dataset", "--columns", "--task-column", "--answers", "--engine", "--num-actors", "--max-new-tokens"):
        assert flag in help_text
    records, answers = _records_with_known_answers(generator, count=6)
    dataset = tmp_path / "dolly.jsonl"
    dataset.write_text("".join(json.dumps({"instruction": r["instruction"], "context": r["input"], "response": r["output"], "category": r["task"]}) + "\n" for r in records))
    env = {**os.environ, "RAY_ADDRESS": "local"}
    args = ["--model", tiny_model_dir, "--dataset", str(dataset), "--columns", "dolly", "--task-column", "category", "--max-new-tokens", str(GREEDY.max_new_tokens)]
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    scored = [scoring.score(a.response, r["output"], a.finish_reason) for r, a in zip(records, answers, strict=True)]
    assert summary["scored"] == 6 and {k: summary[k] for k in scoring.FIGURES} == pytest.approx(scoring.means(scored), abs=1e-4)
    assert sorted(summary["per_task"]) == sorted({r["task"] for r in records})
    assert any(line.startswith("overall") for line in lines) and any(line.startswith("reverse_word") for line in lines)
    done = testing.run_job_here("evaluate", [*args[:2], "--dataset", str(tmp_path / "missing.jsonl")])
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == f"error: dataset not found: {tmp_path / 'missing.jsonl'}"
