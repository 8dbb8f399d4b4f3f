"""Distributed training on local Ray: 2 CPU workers running DeepSpeed ZeRO-3."""

import contextlib
import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoTokenizer

from dolly_ray import demo, prompts
from dolly_ray.cli import ConfigError
from dolly_ray.generate import scoring
from dolly_ray.generate.generator import GenerationParams, InstructionGenerator
from dolly_ray.train import checkpoint, data, recipe


@pytest.fixture(scope="module")
def demo_run(ray_local, tmp_path_factory):
    """The README's demo, end to end: the learning tests below all read its results.

    With $DOLLY_RAY_DEMO_DIR set (make test), the run and its summary stay there for the
    vLLM lane, which answers with the same checkpoint instead of training it again.
    """
    keep = os.environ.get("DOLLY_RAY_DEMO_DIR")
    if keep:
        shutil.rmtree(keep, ignore_errors=True)
    summary = demo.run(demo.DemoConfig(output_dir=keep or str(tmp_path_factory.mktemp("demo"))))
    if keep:
        with open(os.path.join(keep, "summary.json"), "w") as f:
            json.dump(demo.report(summary)[1], f)
    return summary


@pytest.mark.slow
def test_tiny_model_learns_heldout_tasks(demo_run):
    assert demo_run["exact_match"] >= 0.95, demo_run["heldout_examples"]
    assert demo_run["stopped_at_end_key"] == 1.0
    history = checkpoint.read_history(demo_run["checkpoint"])
    assert history[-1]["train_loss"] < history[0]["train_loss"] / 4
    assert demo_run["eval_loss"] < history[0]["train_loss"] / 4


@pytest.mark.slow
def test_answers_scored_during_training_equal_a_direct_computation(demo_run):
    """--eval-generate: the same 32 held-out records answered at every evaluation, and the
    last evaluation's figures are those of the exported model's answers, scored directly."""
    history = checkpoint.read_history(demo_run["checkpoint"])
    evaluations = [row for row in history if "eval_loss" in row]
    assert len(evaluations) >= 2 and all({"eval_exact_match", "eval_rouge_l", "eval_stopped_at_end"} <= set(row) for row in evaluations)
    last = evaluations[-1]
    assert last["eval_exact_match"] >= 0.9 and last["eval_stopped_at_end"] == 1.0
    assert evaluations[0]["eval_rouge_l"] < last["eval_rouge_l"]  # the answers got better as the loss fell
    with open(demo_run["dataset"]) as f:
        records = [json.loads(line) for line in f]
    # The demo's eval split (its seed 0, 2% held out), in file order, as the run took it.
    heldout = [r for r in records if data.in_eval_split(r["instruction"], r["input"], r["output"], seed=0, eval_fraction=0.02)][:32]
    answers = InstructionGenerator.from_pretrained(demo_run["hf_model"]).generate(heldout, GenerationParams(greedy=True, max_new_tokens=24))
    direct = scoring.means([scoring.score(a.response, r["output"], a.finish_reason) for a, r in zip(answers, heldout, strict=True)])
    assert {name: last[f"eval_{name}"] for name in scoring.FIGURES} == pytest.approx(direct)
    with Image.open(os.path.join(demo_run["hf_model"], checkpoint.LOSS_CURVE_FILE)) as picture:
        assert picture.size == (1300, 400)  # two panels: the losses and the answers' figures


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
    assert checkpoint.LOSS_CURVE_FILE in files and "chat_template.jinja" in files
    with open(os.path.join(hf_model, "generation_config.json")) as f:
        generation_config = json.load(f)
    tokenizer = AutoTokenizer.from_pretrained(hf_model)
    assert generation_config["eos_token_id"] == [tokenizer.convert_tokens_to_ids(prompts.END_KEY), tokenizer.eos_token_id]
    assert generation_config["pad_token_id"] == tokenizer.pad_token_id
    samples = demo_run["samples"]
    assert samples and all(s["finish_reason"] == "stop" for s in samples)
    # A fresh interpreter that imports only transformers reproduces the greedy answers
    # the trained weights gave inside the training run: the chat template writes the
    # Dolly prompt and the saved generation config stops at ### End. The sampling
    # defaults saved (Dolly's top_p 0.92) keep only the top token of a model this sure.
    script = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, samples = sys.argv[1], json.loads(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir)
end_id = tokenizer.convert_tokens_to_ids("### End")
torch.manual_seed(0)
answers = []
for sample in samples:
    system = [{"role": "system", "content": sample["input"]}] if sample["input"] else []
    inputs = tokenizer.apply_chat_template(system + [{"role": "user", "content": sample["instruction"]}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    new = model.generate(**inputs)[0, inputs["input_ids"].shape[1]:].tolist()
    answers.append({"response": tokenizer.decode(new, skip_special_tokens=True).strip(), "stopped": new[-1] == end_id})
print(json.dumps(answers))
"""
    result = subprocess.run([sys.executable, "-c", script, hf_model, json.dumps(samples)], capture_output=True, text=True, timeout=300, check=True)
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    assert answers == [{"response": s["response"], "stopped": True} for s in samples]


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
def test_resume_continues_exactly_where_it_stopped(reference_run):
    """Stopped at step 5 on a loaded machine, then resumed: every step equals the
    uninterrupted run's, so neither the restore nor the timing changed what was trained."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    full = reference_run.summary
    events = EventAccumulator(str(reference_run.tensorboard)).Reload()
    assert {"train_loss", "eval_loss", "eval_exact_match", "eval_rouge_l", "eval_stopped_at_end"} <= set(events.Tags()["scalars"])
    with busy_cpus():  # shuffling, sharding, packing and the step follow the seed, never the timing
        stopped = recipe.run(reference_run.config("interrupted", stop_after_steps=5))
    assert stopped["steps"] == 5 and stopped["finished"] is False
    resumed = recipe.run(reference_run.config("interrupted"))
    # Both took the rows the uninterrupted run prepared: no second read or tokenization pass.
    assert full["prepared_data"]["reused"] is False
    for run in (stopped, resumed):
        assert run["prepared_data"]["reused"] is True and run["prepared_data"]["key"] == full["prepared_data"]["key"]
    assert resumed["finished"] is True and resumed["steps"] == full["steps"] == 20  # 10 per epoch
    assert resumed["epoch"] == 2  # resumed in the first epoch, went on through the second

    full_history, resumed_history = checkpoint.read_history(full["checkpoint"]), checkpoint.read_history(resumed["checkpoint"])
    assert [row["step"] for row in resumed_history] == [row["step"] for row in full_history] == list(range(1, full["steps"] + 1))
    for before, after in zip(full_history, resumed_history, strict=True):
        assert after["learning_rate"] == pytest.approx(before["learning_rate"], rel=1e-9)
        assert after["train_loss"] == pytest.approx(before["train_loss"], rel=1e-4)
        for name in ("eval_loss", "eval_exact_match", "eval_rouge_l", "eval_stopped_at_end"):  # the same records answered
            if name in before:  # (the stopped job also evaluated at its last step, 5)
                assert after[name] == pytest.approx(before[name], rel=1e-4), (name, after["step"])
    assert sum("eval_rouge_l" in row for row in full_history) >= 3
    full_weights = load_file(os.path.join(full["hf_model"], "model.safetensors"))
    resumed_weights = load_file(os.path.join(resumed["hf_model"], "model.safetensors"))
    assert full_weights.keys() == resumed_weights.keys()
    for name, tensor in full_weights.items():
        assert (tensor - resumed_weights[name]).abs().max() < 1e-5, name

    # Run again, the finished run restores its last checkpoint and trains nothing more.
    saved = sorted(path.name for path in (reference_run.storage / "interrupted").glob("checkpoint_*"))
    again = recipe.run(reference_run.config("interrupted"))
    assert again["finished"] is True and again["steps"] == full["steps"] and again["checkpoint"] == resumed["checkpoint"]
    assert sorted(path.name for path in (reference_run.storage / "interrupted").glob("checkpoint_*")) == saved

    # Run again with another learning rate: refused before anything is reserved, not the old run returned.
    with pytest.raises(ConfigError, match=r"^run 'interrupted' in .* was trained with other settings \(learning_rate: 0\.005 -> 0\.001\); pass --name"):
        recipe.run(reference_run.config("interrupted", learning_rate=1e-3))
    assert sorted(path.name for path in (reference_run.storage / "interrupted").glob("checkpoint_*")) == saved
