"""Model families beyond GPT-J: GPT-NeoX (Pythia) and the Llama style (Llama, Mistral with
its sliding window, and Qwen2 with tied embeddings) each run the whole path with tiny
local models: ZeRO-3 training with ``pack`` and ``pad`` on 2 workers, export, reload
with plain transformers, generation, Serve and the batch job."""

import json
import os
from dataclasses import dataclass

import numpy as np
import pytest
import requests
import torch
from safetensors.torch import load_file

from dolly_ray import prompts, testing
from dolly_ray.batch import generation, output
from dolly_ray.batch.config import BatchConfig
from dolly_ray.generate.generator import GenerationParams, InstructionGenerator
from dolly_ray.records import tasks
from dolly_ray.serve import server as dolly_serve
from dolly_ray.serve.config import ServeConfig
from dolly_ray.train import checkpoint, memory_plan, recipe

# The rest of the suite runs GPT-J's whole path.
WHOLE_PATH = [family for family in testing.FAMILIES if family != "gptj"]
GREEDY = GenerationParams(greedy=True, max_new_tokens=16)
# Optimizer steps of the packed run: enough to cut the loss by more than 30% at its learning rate.
PACK_STEPS = 12
INSTRUCTIONS = [("Reverse the letters of the word.", "ray"), ("Name a primary color.", None), ("Sort the numbers.", "3 1 2")]


@dataclass
class Trained:
    family: str
    base_model: str
    runs: dict  # batching strategy -> the run's summary


@pytest.fixture(scope="module", params=WHOLE_PATH)
def trained(request, ray_local, family_model_dir, tmp_path_factory):
    """One family's model trained twice on 2 ZeRO-3 workers: packed (the checkpoint the
    other tests use) and padded."""
    family = request.param
    base_model = family_model_dir(family)
    out = tmp_path_factory.mktemp(f"runs-{family}")
    dataset = tasks.write_jsonl(tasks.generate(160, seed=11), out / "tasks.jsonl")
    runs = {}
    for strategy, micro_batch_size, steps in (("pack", 2, PACK_STEPS), ("pad", 8, 3)):
        config = testing.cpu_train_config(
            base_model, dataset, out, f"{family}-{strategy}", batching=strategy, max_steps=steps, micro_batch_size=micro_batch_size,
            learning_rate=6e-3, warmup_steps=1, log_every=1, checkpoint_every=0,
            sample_prompts=[{"instruction": i, "input": input or ""} for i, input in INSTRUCTIONS] if strategy == "pack" else [],
        )  # fmt: skip
        runs[strategy] = recipe.run(config)
    return Trained(family, base_model, runs)


@pytest.fixture(scope="module")
def reloaded(trained):
    """The packed run's export through the project's generator (plain ``from_pretrained``)."""
    return InstructionGenerator.from_pretrained(trained.runs["pack"]["hf_model"])


@pytest.mark.slow
def test_trains_with_pack_and_pad_under_zero3(trained):
    for strategy, steps in (("pack", PACK_STEPS), ("pad", 3)):
        summary = trained.runs[strategy]
        assert summary["steps"] == steps and summary["finished"] is True, strategy
        history = checkpoint.read_history(summary["checkpoint"])
        assert [row["step"] for row in history] == list(range(1, steps + 1))
        assert all(np.isfinite(row["train_loss"]) for row in history) and np.isfinite(summary["eval_loss"])
        assert all(0.4 < share < 0.6 for share in summary["param_partition_fractions"]), summary["param_partition_fractions"]
    packed = checkpoint.read_history(trained.runs["pack"]["checkpoint"])
    assert packed[-1]["train_loss"] < 0.7 * packed[0]["train_loss"], packed  # packed steps learn; pad's three only start


@pytest.mark.slow
def test_the_export_keeps_the_family_and_its_tied_embeddings(trained):
    from transformers import AutoConfig

    hf_model = trained.runs["pack"]["hf_model"]
    config, base = AutoConfig.from_pretrained(hf_model), AutoConfig.from_pretrained(trained.base_model)
    assert config.model_type == base.model_type == trained.family
    assert config.tie_word_embeddings == base.tie_word_embeddings
    tokenizer = prompts.load_tokenizer(hf_model)
    weights = load_file(os.path.join(hf_model, "model.safetensors"))
    [embedding] = [name for name in weights if name.endswith("embed_tokens.weight") or name.endswith("embed_in.weight")]
    assert weights[embedding].shape[0] >= len(tokenizer)  # the prompt keys have rows
    heads = [name for name in weights if name.endswith("lm_head.weight") or name.endswith("embed_out.weight")]
    if config.tie_word_embeddings:
        assert not heads or torch.equal(weights[heads[0]], weights[embedding])  # saved once, or equal
    else:
        [head] = heads
        end = tokenizer.convert_tokens_to_ids(prompts.END_KEY)
        assert not torch.equal(weights[head][end], weights[embedding][end])


@pytest.mark.slow
def test_plain_transformers_answers_as_the_trained_weights_did(trained, reloaded):
    """The greedy answers the partitioned weights gave inside the run, again from the
    export through plain ``generate`` (its chat template and generation config) and
    through the project's generator."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary = trained.runs["pack"]
    samples = summary["samples"]
    assert samples
    tokenizer = AutoTokenizer.from_pretrained(summary["hf_model"])
    model = AutoModelForCausalLM.from_pretrained(summary["hf_model"], dtype=torch.float32)
    for sample in samples:
        system = [{"role": "system", "content": sample["input"]}] if sample["input"] else []
        messages = system + [{"role": "user", "content": sample["instruction"]}]
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        new = model.generate(**inputs, do_sample=False, max_new_tokens=64)[0, inputs["input_ids"].shape[1] :]
        [ours] = reloaded.generate([(sample["instruction"], sample["input"])], GenerationParams(greedy=True, max_new_tokens=64))
        assert tokenizer.decode(new, skip_special_tokens=True).strip() == ours.response == sample["response"]


@pytest.mark.slow
def test_serve_answers_with_the_family(trained, reloaded, serve_http):
    import openai
    from ray import serve

    name = f"tiny-{trained.family}"
    app = dolly_serve.build_app(ServeConfig(model=trained.runs["pack"]["hf_model"], model_name=name, num_cpus_per_replica=0.5))
    serve.run(app, name=name, route_prefix=f"/{trained.family}")
    try:
        client = openai.OpenAI(base_url=f"{serve_http}/{trained.family}/v1", api_key="unused", max_retries=0)
        for instruction, input in INSTRUCTIONS:
            [expected] = reloaded.generate([(instruction, input)], GREEDY)
            messages = ([{"role": "system", "content": input}] if input else []) + [{"role": "user", "content": instruction}]
            chat = client.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=GREEDY.max_new_tokens)
            assert chat.choices[0].message.content == expected.response
            assert chat.usage.completion_tokens == expected.num_generated_tokens
            stream = client.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=GREEDY.max_new_tokens, stream=True)
            assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == expected.response
        # GPT-NeoX's attention cannot use transformers' paged KV cache: its replica batches statically.
        stats = requests.get(f"{serve_http}/{trained.family}/v1/stats", timeout=30).json()
        assert stats["batching"] == ("static" if trained.family == "gpt_neox" else "continuous")
    finally:
        serve.delete(name)


@pytest.mark.slow
def test_batch_generation_answers_every_row(trained, reloaded, tmp_path):
    source = tmp_path / "in.jsonl"
    rows = [{"instruction": instruction, "input": input or "", "id": i} for i, (instruction, input) in enumerate(INSTRUCTIONS)]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows[:2]) + '{"input": "no instruction"}\n' + json.dumps(rows[2]) + "\n")
    summary = generation.run(
        BatchConfig(
            model=trained.runs["pack"]["hf_model"], input=str(source), output=str(tmp_path / "answers"), greedy=True,
            max_new_tokens=GREEDY.max_new_tokens, batch_size=2, num_actors=1, num_cpus_per_actor=1,
        )
    )  # fmt: skip
    out = list(output.read_rows(str(tmp_path / "answers")))
    assert summary["rows"] == len(out) == 4 and summary["errors"] == 1
    assert out[2]["error"].startswith("missing_instruction") and out[2]["response"] is None
    good = [row for row in out if row["error"] is None]
    expected = reloaded.generate(INSTRUCTIONS, GREEDY)
    assert [row["id"] for row in good] == [0, 1, 2]
    assert [row["response"] for row in good] == [e.response for e in expected]


@pytest.mark.parametrize("family", testing.FAMILIES)
def test_the_memory_plan_reads_each_family(family, family_model_dir, ray_local, tmp_path):
    """``--dry-run`` on each family: the plan counts the model's own parameters (tied
    embeddings once) and the prompt keys' rows do not break it."""
    from transformers import AutoModelForCausalLM

    model_dir = family_model_dir(family)
    config = testing.cpu_train_config(model_dir, "tatsu-lab/alpaca", tmp_path, "plan", dry_run=True)
    plan = recipe.run(config)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert plan["dry_run"] is True and plan["parameters"] == sum(p.numel() for p in model.parameters())
    assert plan["per_gpu_gib"]["total"] > 0 and not os.listdir(tmp_path)


@pytest.mark.parametrize(
    "family, parameters",
    [("llama", 6_738_415_616), ("mistral", 7_241_732_096)],  # Llama-2-7B's and Mistral-7B's published counts
)
def test_the_memory_plan_counts_the_7b_shapes(family, parameters):
    from transformers import LlamaConfig, MistralConfig

    shape = memory_plan.ModelShape.from_config({"llama": LlamaConfig, "mistral": MistralConfig}[family]())  # their defaults are the 7B shapes
    assert shape.parameters == parameters
