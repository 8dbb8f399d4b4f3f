"""The memory and time plan: DeepSpeed's own estimator agrees with its model states, the
GPU presets fit GPT-J 6B on the hardware Dolly trained on, and what cannot fit is refused."""

import json
import os
import shutil

import pytest
from transformers import GPTJConfig

from dolly_ray import testing
from dolly_ray.train import deepspeed_config, memory_plan, settle

GIB = 2**30


@pytest.fixture(scope="module")
def gptj_6b():
    return memory_plan.ModelShape.from_config(GPTJConfig())  # GPTJConfig's defaults are GPT-J 6B's shape


def _choose(shape, gpu, workers, memory=None, **fixed):
    fixed = {"micro_batch_size": None, "gradient_checkpointing": None, **fixed}
    preset = settle.preset_for_accelerator(gpu, memory)
    return memory_plan.choose(shape, preset=preset, workers=workers, max_length=1024, gpu=gpu, gpu_memory_gib=memory, **fixed)


def test_gptj_6b_has_its_shape(gptj_6b):
    assert gptj_6b.parameters == 6_050_882_784 and gptj_6b.layers == 28 and gptj_6b.hidden == 4096
    assert gptj_6b.largest_module_parameters == 4096 * 50400 + 50400  # the output layer


@pytest.mark.parametrize(
    "gpu, workers, memory, preset",
    [("A10G", 4, None, "a10"), ("V100", 8, None, "v100"), ("V100", 8, 31.7, "v100"), ("A100", 8, None, "a100"), ("A100-80G", 8, None, "a100")],
)
def test_gptj_6b_fits_the_gpus_dolly_trained_on(gptj_6b, gpu, workers, memory, preset):
    plan = _choose(gptj_6b, gpu, workers, memory)
    assert plan.preset == preset and plan.fits, plan.summary()
    assert plan.per_gpu_gib["total"] <= memory_plan.GPU_HEADROOM * plan.gpu_memory_gib
    if preset != "a100":  # the offloading presets keep Adam's state in CPU RAM
        assert plan.per_gpu_gib["optimizer_state"] == 0 and plan.cpu_per_node_gib["offloaded_state"] > 80
    # The old default (8 packed rows of 1024 tokens, no checkpointing) fits none of the smaller GPUs.
    old_default = _choose(gptj_6b, gpu, workers, memory, micro_batch_size=8, gradient_checkpointing=False)
    assert old_default.fits == (gpu == "A100-80G"), old_default.summary()
    assert old_default.activations_gib["without_checkpointing"] > 40


@pytest.mark.parametrize("preset, workers", [("a10", 4), ("v100", 8), ("a100", 8)])
def test_model_states_agree_with_deepspeeds_estimator(gptj_6b, preset, workers):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    plan = memory_plan.plan(gptj_6b, preset=preset, workers=workers, micro_batch_size=1, max_length=1024, gradient_checkpointing=True)
    offload = "offload_optimizer" in deepspeed_config.PRESETS[preset]["zero_optimization"]
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        total_params=gptj_6b.parameters,
        largest_layer_params=gptj_6b.largest_module_parameters,
        num_gpus_per_node=plan.gpus_per_node,
        num_nodes=workers // plan.gpus_per_node,
        cpu_offload=offload,
        cpu_offload_params=False,
        additional_buffer_factor=1.0,  # the estimator's optional margin; the plan's totals carry their own buffers
    )
    assert plan.model_states_gib["gpu"] == pytest.approx(gpu / GIB, rel=0.1)
    if offload:
        assert plan.model_states_gib["cpu_per_node"] == pytest.approx(cpu / GIB, rel=0.1)


def test_checkpointing_keeps_one_layer_input_per_token(gptj_6b):
    plan = memory_plan.plan(gptj_6b, preset="a10", workers=4, micro_batch_size=4, max_length=1024, gradient_checkpointing=True)
    activations = plan.activations_gib
    assert activations["with_checkpointing"] < activations["without_checkpointing"] / 10
    assert plan.per_gpu_gib["activations"] == activations["with_checkpointing"]
    assert plan.tokens_per_micro_batch == 4096 and plan.tokens_per_step == 4 * 4096


def test_time_follows_the_gpus_and_the_epoch(gptj_6b):
    a10 = _choose(gptj_6b, "A10G", 4).with_epoch_tokens(7_000_000)
    a100 = _choose(gptj_6b, "A100", 8).with_epoch_tokens(7_000_000)
    assert a100.time["tokens_per_s"] > 5 * a10.time["tokens_per_s"]
    assert a10.time["epoch_hours"] == pytest.approx(7_000_000 / a10.time["tokens_per_s"] / 3600, abs=0.01)


def _job(*args):
    """``jobs/train.py`` with ``args``, in this process (on the session's local Ray)."""
    return testing.run_job_here("train", list(args))


@pytest.fixture(scope="module")
def gptj_6b_config_dir(tmp_path_factory):
    """GPT-J 6B's config.json beside a tokenizer, and no weights: all a plan reads."""
    path = tmp_path_factory.mktemp("gptj-6b-config")
    GPTJConfig().save_pretrained(path)
    testing.build_tokenizer(path)
    return str(path)


def test_dry_run_prints_the_plan_and_starts_no_training(ray_local, gptj_6b_config_dir, tmp_path):
    done = _job("--dry-run", "--model", gptj_6b_config_dir, "--accelerator-type", "A10G", "--num-workers", "4", "--storage-path", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    plan = json.loads(done.stdout.splitlines()[-1])
    assert plan["dry_run"] is True and plan["fits"] is True
    assert (plan["preset"], plan["gpu"], plan["workers"], plan["parameters"]) == ("a10", "A10G", 4, 6_050_882_784)
    assert plan["gradient_checkpointing"] is True and plan["micro_batch_size"] >= 1
    assert set(plan["per_gpu_gib"]) >= {"parameters", "gradients", "optimizer_state", "activations", "buffers", "total"}
    assert plan["time"]["assumed_mfu"] and plan["time"]["tokens_per_s"] > 0
    assert not os.listdir(tmp_path)  # no run directory: nothing trained


def test_a_run_that_cannot_fit_is_refused_with_the_plan(ray_local, gptj_6b_config_dir, tmp_path):
    # A stand-in weights file: the run is refused on its plan, long before weights would load.
    model = tmp_path / "model"
    shutil.copytree(gptj_6b_config_dir, model)
    (model / "model.safetensors").write_bytes(b"")
    done = _job(
        "--model", str(model), "--accelerator-type", "A10G", "--num-workers", "4", "--micro-batch-size", "8",
        "--no-gradient-checkpointing", "--storage-path", str(tmp_path / "runs"),
    )  # fmt: skip
    assert done.returncode == 2
    [error] = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert error.startswith("error: the run does not fit: preset a10 on 4x A10G (22 GiB), micro-batch 8 x 1024 tokens, gradient checkpointing off")
    assert "activations" in error and "--gradient-checkpointing" in error


def test_overrides_and_cpus_change_the_plan(gptj_6b):
    a100 = memory_plan.plan(gptj_6b, preset="a100", workers=8, micro_batch_size=1, max_length=1024, gradient_checkpointing=True)
    offloaded = memory_plan.plan(
        gptj_6b, preset="a100", workers=8, micro_batch_size=1, max_length=1024, gradient_checkpointing=True,
        overrides={"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
    )  # fmt: skip
    assert offloaded.per_gpu_gib["optimizer_state"] == 0 < a100.per_gpu_gib["optimizer_state"]
    assert offloaded.cpu_per_node_gib["offloaded_state"] > 80
    # A GPU preset rehearsed on CPUs is held to the node's RAM, with every worker on it.
    rehearsal = memory_plan.plan(gptj_6b, preset="a10", workers=2, micro_batch_size=1, max_length=1024, gradient_checkpointing=True, on_cpu=True, node_memory_gib=24)
    assert rehearsal.gpu == "" and not rehearsal.fits and rehearsal.cpu_per_node_gib["total"] > 24 and rehearsal.cpu_per_node_gib["workers"] > 0
    assert "more RAM" in memory_plan.advice(rehearsal, micro_batch_fixed=False, checkpointing_fixed=False)

