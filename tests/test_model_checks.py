"""Every job that generates checks its model on the driver first: a model it cannot
serve is refused in one line, within seconds, before any replica or actor starts."""

import logging
import time

import pytest

from dolly_ray import models, testing
from dolly_ray.records import tasks

JOBS = {
    "serve": lambda model, tmp: ["--model", model],
    "batch_generate": lambda model, tmp: ["--model", model, "--input", str(tmp / "in.jsonl"), "--output", str(tmp / "out.jsonl")],
    "evaluate": lambda model, tmp: ["--model", model, "--dataset", str(tmp / "in.jsonl")],
}


@pytest.mark.parametrize("job", sorted(JOBS))
def test_a_model_without_rows_for_the_prompt_keys_is_refused_in_one_line(job, family_model_dir, tmp_path):
    """A Llama-style base model has exactly its tokenizer's embedding rows: the prompt keys
    training adds have none (its replica used to fail three times with a long traceback)."""
    base = family_model_dir("llama")
    tasks.write_jsonl(tasks.generate(4, seed=0), tmp_path / "in.jsonl")
    start = time.perf_counter()
    done = testing.run_job_here(job, JOBS[job](base, tmp_path))
    assert time.perf_counter() - start < 60
    assert done.returncode == 2 and done.stdout == "", done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"error: model '{base}' has ") and "embedding rows but needs row" in lines[0], lines[0]
    assert "was not trained by dolly_ray; pass a training run's hf/ folder, or train this model first" in lines[0]


@pytest.mark.parametrize("job", sorted(JOBS))
def test_a_missing_model_is_refused_in_one_line(job, tmp_path):
    tasks.write_jsonl(tasks.generate(4, seed=0), tmp_path / "in.jsonl")
    done = testing.run_job_here(job, JOBS[job](str(tmp_path / "no-model"), tmp_path))
    assert done.returncode == 2 and done.stderr.strip() == f"error: model directory not found: {tmp_path / 'no-model'}"


def test_a_base_model_with_spare_rows_is_served_with_a_warning(tiny_model_dir, caplog):
    """GPT-J's embeddings have spare rows: a base model runs, but never learnt to stop."""
    with caplog.at_level(logging.WARNING, logger="dolly_ray.models"):
        models.check_loadable_model(tiny_model_dir, max_new_tokens=16)
    assert "was not trained with Dolly's prompt keys: its answers will not stop at ### End" in caplog.text
