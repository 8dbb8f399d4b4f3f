"""LoRA with peft: adapters and the prompt keys' rows train under ZeRO-3, checkpoints hold
only them, and the merged export answers as base + adapter. The run under ZeRO-3 is the
session's reference run (tests/conftest.py), whose exact resume after a stop and after
killed workers tests/test_train.py and tests/test_reliability.py check."""

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPTJConfig

from dolly_ray import prompts, testing
from dolly_ray.cli import ConfigError
from dolly_ray.generate.generator import GenerationParams, InstructionGenerator
from dolly_ray.train import checkpoint, lora, memory_plan, recipe

LORA = {"r": 8, "alpha": 16.0, "dropout": 0.05, "targets": "all-linear"}
PROMPTS = [{"instruction": "Reverse the letters of the word.", "input": "ray"}, {"instruction": "Sort the numbers.", "input": "3 1 2"}]


def _inputs(tokenizer, records):
    return torch.tensor([tokenizer.encode(prompts.format_prompt(r["instruction"], r["input"]))[-24:] for r in records])


@pytest.mark.parametrize("family", ["gptj", "llama", "qwen2"])
def test_the_merged_weights_answer_as_base_plus_adapter(family, tmp_path):
    """Without DeepSpeed: a few optimizer steps on the adapters, then the merge of the
    whole state dict against the adapter loaded on the base (GPT-J: head bias; Llama:
    resized, untied; Qwen2: tied embeddings)."""
    base = str(testing.build_model(tmp_path / "base", family=family, head_bias_std=0.5 if family == "gptj" else 0.0))
    tokenizer = prompts.load_tokenizer(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model = lora.add_adapters(model, tokenizer, **{**LORA, "dropout": 0.0})
    trained = lora.trainable_parameters(model)
    assert 0 < sum(p.numel() for p in trained) < 0.5 * sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(trained, lr=1e-2)
    batch = torch.tensor([tokenizer.encode(prompts.format_training_text("Say hi.", "hi", ""))] * 2)
    for _ in range(3):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp_path / "adapter", state_dict=lora.adapter_state_dict(model), save_embedding_layers=False)
    tokenizer.save_pretrained(tmp_path / "adapter")
    model.get_base_model().save_pretrained(tmp_path / "merged", state_dict=lora.merged_state_dict(model.state_dict(), model))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)  # plain transformers
    with_adapter = lora.load_with_adapter(base, str(tmp_path / "adapter"), dtype=torch.float32)
    inputs = _inputs(tokenizer, PROMPTS)
    with torch.no_grad():
        expected = model(input_ids=inputs).logits
        torch.testing.assert_close(merged(input_ids=inputs).logits, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(with_adapter(input_ids=inputs).logits, expected, rtol=0, atol=1e-5)
    assert (merged.get_input_embeddings().weight is merged.get_output_embeddings().weight) == (family == "qwen2")


def test_the_plan_counts_only_what_lora_trains():
    """GPT-J 6B on one A10G: full fine-tuning cannot fit, LoRA (r 16) does, with optimizer
    state for its 33M trainable parameters only."""
    shape = memory_plan.ModelShape.from_config(GPTJConfig())
    lora_shape = memory_plan.ModelShape.from_config(GPTJConfig(), lora_settings={**LORA, "r": 16})
    assert lora_shape.parameters == shape.parameters == shape.trainable_parameters
    assert lora_shape.trainable_parameters == 16 * 28 * (4 * 2 * 4096 + 2 * (4096 + 16384)) + 2 * 3 * 4096  # A and B of 6 linears per layer, 3 rows x 2
    settings = dict(workers=1, micro_batch_size=None, gradient_checkpointing=None, max_length=1024, gpu="A10G")
    # Adam on the GPU (the a100 preset's way): full fine-tuning's state cannot fit, LoRA's does.
    full, adapted = (memory_plan.choose(s, preset="a100", **settings) for s in (shape, lora_shape))
    assert not full.fits and adapted.fits, (full.summary(), adapted.summary())
    assert adapted.per_gpu_gib["optimizer_state"] < 1 and adapted.trainable_parameters == lora_shape.trainable_parameters
    # Adam offloaded (a10): full fine-tuning needs the host RAM of a 4-GPU node, LoRA under a GiB.
    full, adapted = (memory_plan.choose(s, preset="a10", **settings) for s in (shape, lora_shape))
    assert adapted.cpu_per_node_gib["offloaded_state"] < 1 < 100 < full.cpu_per_node_gib["offloaded_state"]
    with pytest.raises(ConfigError, match="--lora-target-modules 'qkv_proj'"):
        memory_plan.ModelShape.from_config(GPTJConfig(), lora_settings={**LORA, "targets": "qkv_proj"})


@pytest.mark.slow
def test_a_dry_run_plans_lora_and_refuses_targets_the_model_lacks(ray_local, tiny_model_dir, tmp_path):
    def plan(**lora_flags):
        return recipe.run(testing.cpu_train_config(tiny_model_dir, "tatsu-lab/alpaca", tmp_path, "plan", dry_run=True, **lora_flags))

    full, adapted = plan(), plan(lora_r=8)
    assert adapted["parameters"] == full["parameters"] == full["trainable_parameters"] > 5 * adapted["trainable_parameters"]
    with pytest.raises(ConfigError, match=r"--lora-target-modules 'query_key_value'"):  # GPT-NeoX's name, not GPT-J's
        plan(lora_r=8, lora_target_modules="query_key_value")


@pytest.mark.slow
def test_lora_trains_and_its_checkpoints_hold_the_adapter(reference_run):
    run = reference_run.summary
    history = checkpoint.read_history(run["checkpoint"])
    # Adapters on a random base learn slowly (the LoRA demo first trains a base for this
    # reason): 20 steps cut the loss by more than a tenth, far beyond step-to-step noise.
    assert run["finished"] is True and history[-1]["train_loss"] < 0.9 * history[0]["train_loss"], [row["train_loss"] for row in history]
    checkpoint_dir = Path(run["checkpoint"])
    state_bytes = sum(f.stat().st_size for f in (checkpoint_dir / "deepspeed").rglob("*") if f.is_file())
    model_bytes = os.path.getsize(os.path.join(run["hf_model"], "model.safetensors"))
    assert state_bytes < 0.5 * model_bytes  # the adapters' weights and Adam state, not the model's
    adapter = load_file(checkpoint_dir / "adapter" / "adapter_model.safetensors")
    assert adapter and all(t.numel() > 0 for t in adapter.values())  # gathered, not ZeRO-3's empty partitions
    assert run["adapter"] == str(checkpoint_dir / "adapter")


@pytest.mark.slow
def test_the_merged_export_answers_as_base_plus_adapter(reference_run):
    run = reference_run.summary
    tokenizer = prompts.load_tokenizer(run["hf_model"])
    merged = AutoModelForCausalLM.from_pretrained(run["hf_model"], dtype=torch.float32)  # plain transformers
    with_adapter = lora.load_with_adapter(reference_run.base, run["adapter"], dtype=torch.float32)
    assert with_adapter.get_output_embeddings().original_module.bias.abs().sum() > 0  # GPT-J's head bias (the hook keeps it)
    inputs = _inputs(tokenizer, reference_run.prompts)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=inputs).logits, with_adapter(input_ids=inputs).logits, rtol=0, atol=1e-5)
        # The adapters changed the model: trained (B is no longer zero) and moving the logits.
        adapter = load_file(Path(run["adapter"]) / "adapter_model.safetensors")
        assert all(t.abs().max() > 0 for name, t in adapter.items() if "lora_B" in name)
        base = AutoModelForCausalLM.from_pretrained(reference_run.base, dtype=torch.float32)
        assert (base(input_ids=inputs).logits - with_adapter(input_ids=inputs).logits).abs().max() > 0.1
    greedy = GenerationParams(greedy=True, max_new_tokens=16)
    answers = InstructionGenerator.from_pretrained(run["hf_model"]).generate(reference_run.prompts, greedy)
    assert [a.response for a in answers] == [a.response for a in InstructionGenerator(with_adapter, tokenizer).generate(reference_run.prompts, greedy)]
    # the partitioned weights inside the run (their samples, 64 new tokens) answered the same
    inside = InstructionGenerator.from_pretrained(run["hf_model"]).generate(reference_run.prompts, GenerationParams(greedy=True, max_new_tokens=64))
    assert [s["response"] for s in run["samples"]] == [a.response for a in inside]
