"""Distributed training on local Ray: 2 CPU workers running DeepSpeed ZeRO-3."""

import contextlib
import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from dolly_ray import checkpoint, demo, prompts, tasks, testing, train


@pytest.fixture(scope="module")
def demo_run(ray_local, tmp_path_factory):
    """The README's demo, end to end: the learning tests below all read its results."""
    return demo.run(demo.DemoConfig(output_dir=str(tmp_path_factory.mktemp("demo"))))


@pytest.mark.slow
def test_tiny_model_learns_heldout_tasks(demo_run):
    assert demo_run["exact_match"] >= 0.95, demo_run["heldout_examples"]
    assert demo_run["stopped_at_end_key"] == 1.0
    history = checkpoint.read_history(demo_run["checkpoint"])
    assert history[-1]["train_loss"] < history[0]["train_loss"] / 4
    assert demo_run["eval_loss"] < history[0]["train_loss"] / 4


@pytest.mark.slow
def test_zero3_partitions_parameters_across_workers(demo_run):
    # Each of the 2 workers holds about half of every parameter tensor, not a full copy.
    fractions = demo_run["param_partition_fractions"]
    assert len(fractions) == 2
    assert all(0.45 < share < 0.56 for share in fractions), fractions


@pytest.mark.slow
def test_hf_checkpoint_reloads_with_plain_transformers(demo_run, tmp_path):
    hf_model = demo_run["hf_model"]
    files = os.listdir(hf_model)
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    assert checkpoint.LOSS_CURVE_FILE in files
    samples = demo_run["samples"]
    assert samples and all(s["finish_reason"] == "stop" for s in samples)
    # A fresh interpreter that imports only transformers reproduces the greedy answers
    # the trained weights gave inside the training run.
    script = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, prompts = sys.argv[1], json.loads(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir)
end_id = tokenizer.convert_tokens_to_ids("### End")
answers = []
for prompt in prompts:
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=64, do_sample=False, eos_token_id=end_id, pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    answers.append(tokenizer.decode(new[: new.index(end_id)] if end_id in new else new).strip())
print(json.dumps(answers))
"""
    prompt_texts = [prompts.format_prompt(s["instruction"], s["input"]) for s in samples]
    result = subprocess.run(
        [sys.executable, "-c", script, hf_model, json.dumps(prompt_texts)], capture_output=True, text=True, timeout=300, check=True
    )
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [s["response"] for s in samples]


def _resume_config(model_dir, dataset, storage, name, **overrides):
    return testing.cpu_train_config(
        model_dir,
        dataset,
        storage,
        name,
        epochs=2,
        micro_batch_size=8,
        learning_rate=2e-3,
        warmup_steps=3,
        log_every=1,
        checkpoint_every=4,
        **overrides,
    )


@pytest.mark.slow
def test_resume_continues_exactly_where_it_stopped(ray_local, tiny_model_dir, tmp_path):
    dataset = tasks.write_jsonl(tasks.generate(200, seed=5), tmp_path / "tasks.jsonl")
    full = train.run(_resume_config(tiny_model_dir, dataset, tmp_path, "uninterrupted", tensorboard_dir=str(tmp_path / "tb")))
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tb" / "uninterrupted"))
    stopped = train.run(_resume_config(tiny_model_dir, dataset, tmp_path, "interrupted", stop_after_steps=5))
    assert stopped["steps"] == 5 and stopped["finished"] is False
    resumed = train.run(_resume_config(tiny_model_dir, dataset, tmp_path, "interrupted"))
    assert resumed["finished"] is True and resumed["steps"] == full["steps"] > 5

    full_history, resumed_history = checkpoint.read_history(full["checkpoint"]), checkpoint.read_history(resumed["checkpoint"])
    assert [row["step"] for row in resumed_history] == list(range(1, full["steps"] + 1))
    for before, after in zip(full_history, resumed_history):
        assert after["learning_rate"] == pytest.approx(before["learning_rate"], rel=1e-9)
        assert after["train_loss"] == pytest.approx(before["train_loss"], rel=1e-4)
    full_weights = load_file(os.path.join(full["hf_model"], "model.safetensors"))
    resumed_weights = load_file(os.path.join(resumed["hf_model"], "model.safetensors"))
    assert full_weights.keys() == resumed_weights.keys()
    for name, tensor in full_weights.items():
        assert (tensor - resumed_weights[name]).abs().max() < 1e-5, name


@contextlib.contextmanager
def busy_cpus(seconds: float = 900):
    """A loaded machine for the length of the block: one busy process per core (niced, so
    Ray's workers still progress), each ending by itself after ``seconds``."""
    spin = f"import os, time\nos.nice(19)\nend = time.time() + {seconds}\nwhile time.time() < end: pass"
    burners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(os.cpu_count() or 2)]
    try:
        yield
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()


@pytest.mark.slow
def test_the_same_seed_gives_the_same_losses_on_a_loaded_machine(ray_local, tiny_model_dir, tmp_path):
    """Shuffling, sharding, packing and the step all follow the seed, never the timing."""
    dataset = tasks.write_jsonl(tasks.generate(400, seed=7), tmp_path / "tasks.jsonl")

    def losses(name):
        config = testing.cpu_train_config(
            tiny_model_dir, dataset, tmp_path, name, max_steps=6, micro_batch_size=4, learning_rate=2e-3, warmup_steps=1, log_every=1, batching="pad"
        )
        return [row["train_loss"] for row in checkpoint.read_history(train.run(config)["checkpoint"])]

    quiet = losses("quiet")
    with busy_cpus():
        loaded = losses("loaded")
    assert len(quiet) == 6 and loaded == quiet

