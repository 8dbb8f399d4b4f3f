"""DeepSpeed presets are complete data: nothing left as "auto", batch sizes consistent."""

import json

import pytest
import torch

from dolly_ray.train import deepspeed_config


def _build(preset, **overrides):
    return deepspeed_config.build(
        preset,
        world_size=4,
        micro_batch_size=8,
        gradient_accumulation_steps=2,
        learning_rate=1e-5,
        weight_decay=0.0,
        warmup_steps=10,
        total_steps=100,
        overrides=overrides or None,
    )


@pytest.mark.parametrize("preset", sorted(deepspeed_config.PRESETS))
def test_every_preset_is_complete_zero3(preset):
    config = _build(preset)
    assert "auto" not in json.dumps(config)
    assert config["zero_optimization"]["stage"] == 3
    assert config["train_batch_size"] == 8 * 2 * 4
    assert config["scheduler"]["params"]["total_num_steps"] == 100
    assert ("optimizer" in config) == (preset != "cpu")


def test_presets_match_their_hardware():
    a100, a10, v100, cpu = (_build(p) for p in ("a100", "a10", "v100", "cpu"))
    assert a100["bf16"]["enabled"] and "offload_optimizer" not in a100["zero_optimization"]
    assert a10["bf16"]["enabled"] and a10["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert v100["fp16"]["enabled"] and v100["fp16"]["loss_scale"] == 0 and "bf16" not in v100
    assert v100["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "bf16" not in cpu and "fp16" not in cpu
    assert [deepspeed_config.model_dtype(c) for c in (a100, a10, v100, cpu)] == [torch.bfloat16, torch.bfloat16, torch.float16, torch.float32]
    assert deepspeed_config.model_dtype(_build("a100", bf16={"enabled": False})) == torch.float32


def test_overrides_merge_over_the_preset():
    config = _build("a10", zero_optimization={"offload_param": {"device": "cpu"}}, train_micro_batch_size_per_gpu=4)
    assert config["zero_optimization"]["offload_param"] == {"device": "cpu"}
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"  # kept
    assert config["train_batch_size"] == 4 * 2 * 4  # follows the overridden micro batch
    assert "offload_param" not in deepspeed_config.PRESETS["a10"]["zero_optimization"]  # preset untouched


def test_inconsistent_batch_and_unknown_preset_are_refused():
    with pytest.raises(ValueError, match="train_batch_size 7"):
        _build("a100", train_batch_size=7)
    with pytest.raises(ValueError, match="unknown preset 'h100'"):
        _build("h100")


@pytest.mark.parametrize(
    "gpu, capability, memory_gib, preset",
    [
        ("A100 80GB", (8, 0), 79.3, "a100"),
        ("A100 40GB", (8, 0), 39.4, "a100"),
        ("L40S", (8, 9), 44.4, "a100"),
        ("H100", (9, 0), 79.1, "a100"),
        ("A10G", (8, 6), 22.1, "a10"),
        ("L4", (8, 9), 22.0, "a10"),
        ("V100 16GB", (7, 0), 15.8, "v100"),
        ("V100 32GB", (7, 0), 31.7, "v100"),
        ("T4", (7, 5), 14.6, "v100"),
    ],
)
def test_auto_preset_follows_the_gpu(gpu, capability, memory_gib, preset):
    assert deepspeed_config.preset_for_gpu(capability, memory_gib) == preset, gpu
