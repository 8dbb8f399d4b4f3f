"""The GPU presets rehearsed on CPUs: ``a10`` (bf16, Adam offloaded to the CPU) and ``v100``
(fp16 with dynamic loss scaling, offloaded Adam), each under ZeRO-3 on 2 workers. The a10
run is stopped and resumed exactly; the v100 run shows the loss scale at work.

Each run is the job a user starts, ``jobs/train.py --preset a10 --no-use-gpu``, on a local
Ray of its own whose processes have ``tests/cpu_fp16`` on their path: DeepSpeed's CPU
accelerator refuses fp16 on CPUs without AVX512-FP16, and that shim lets the v100
preset run anyway. The first run compiles DeepSpeed's CPU Adam (minutes, then cached
under ``TORCH_EXTENSIONS_DIR``).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dolly_ray.records import tasks
from dolly_ray.train import checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.gpu_presets_on_cpu]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIM = os.path.join(ROOT, "tests", "cpu_fp16")
STEPS = 8
# The v100 run with the preset's own loss scale: enough steps past the first overflows to learn.
V100_STEPS = 20


def _train(model, dataset, storage, name, preset, *flags) -> dict:
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": os.pathsep.join([SHIM, os.environ.get("PYTHONPATH", "")])}
    args = [
        "--preset", preset, "--no-use-gpu", "--model", model, "--dataset", str(dataset), "--num-workers", "2", "--batching", "pad",
        "--max-steps", str(STEPS), "--micro-batch-size", "8", "--max-length", "128", "--learning-rate", "2e-3", "--warmup-steps", "1",
        "--log-every", "1", "--checkpoint-every", "4", "--eval-fraction", "0.1", "--storage-path", str(storage), "--name", name, *flags,
    ]  # fmt: skip
    done = subprocess.run([sys.executable, "jobs/train.py", *args], capture_output=True, text=True, timeout=1800, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return tasks.write_jsonl(tasks.generate(200, seed=5), tmp_path_factory.mktemp("gpu-presets") / "tasks.jsonl")


def test_the_a10_preset_trains_resumes_exactly_and_exports_bf16(tiny_model_dir, dataset, tmp_path):
    full = _train(tiny_model_dir, dataset, tmp_path, "full", "a10")
    stopped = _train(tiny_model_dir, dataset, tmp_path, "resumed", "a10", "--stop-after-steps", str(STEPS // 2))
    resumed = _train(tiny_model_dir, dataset, tmp_path, "resumed", "a10")
    assert full["preset"] == "a10" and full["finished"] is True and full["steps"] == STEPS
    assert stopped["steps"] == STEPS // 2 and stopped["finished"] is False and resumed["finished"] is True

    history, resumed_history = checkpoint.read_history(full["checkpoint"]), checkpoint.read_history(resumed["checkpoint"])
    assert history[-1]["train_loss"] < 0.92 * history[0]["train_loss"]
    assert [row["step"] for row in resumed_history] == list(range(1, STEPS + 1))
    for before, after in zip(history, resumed_history, strict=True):
        assert after["train_loss"] == pytest.approx(before["train_loss"], rel=1e-5), after["step"]
        assert after["learning_rate"] == before["learning_rate"]
    assert "loss_scale" not in history[-1]  # bf16 needs no loss scaling

    # The consolidated 16-bit export: plain transformers loads it in its training precision.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(full["hf_model"])
    assert model.dtype == torch.bfloat16
    weights, resumed_weights = load_file(os.path.join(full["hf_model"], "model.safetensors")), load_file(os.path.join(resumed["hf_model"], "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    for name, tensor in weights.items():
        assert torch.equal(tensor, resumed_weights[name]), name
    tokenizer = AutoTokenizer.from_pretrained(full["hf_model"])
    inputs = tokenizer("Reverse the letters of the word.", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]  # it generated (the output holds the prompt too)


def test_v100_overflow_skips_the_step_and_halves_the_loss_scale(tiny_model_dir, dataset, tmp_path):
    # 2**40 overflows fp16 gradients at once; with hysteresis 1 every overflow halves the scale.
    overrides = json.dumps({"fp16": {"initial_scale_power": 40, "hysteresis": 1}})
    summary = _train(tiny_model_dir, dataset, tmp_path, "overflow", "v100", "--max-steps", "3", "--deepspeed", overrides)
    history = checkpoint.read_history(summary["checkpoint"])
    assert [row["skipped_steps"] for row in history] == [1, 2, 3]
    assert [row["loss_scale"] for row in history] == [2.0**39, 2.0**38, 2.0**37]
    # No step was applied: the exported weights are the base model's (the scheduler did not move either).
    assert len({row["learning_rate"] for row in history}) == 1
    exported, base = load_file(os.path.join(summary["hf_model"], "model.safetensors")), load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    for name, tensor in exported.items():
        assert torch.equal(tensor.float(), base[name].half().float()), name
    # The fp16 export loads with plain transformers in fp16.
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(summary["hf_model"]).dtype == torch.float16


def test_the_v100_preset_applies_steps_with_its_own_loss_scale(tiny_model_dir, dataset, tmp_path):
    """The preset as it ships (initial scale 2**16, hysteresis 2): its first steps overflow
    and lower the scale, then steps apply, the loss falls and the weights move."""
    summary = _train(tiny_model_dir, dataset, tmp_path, "own-scale", "v100", "--max-steps", str(V100_STEPS))
    history = checkpoint.read_history(summary["checkpoint"])
    assert [row["step"] for row in history] == list(range(1, V100_STEPS + 1))
    skipped = history[-1]["skipped_steps"]
    assert 0 < skipped and V100_STEPS - skipped >= V100_STEPS // 2, [(row["skipped_steps"], row["loss_scale"]) for row in history]
    assert history[-1]["loss_scale"] < 2.0**16
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"], [row["train_loss"] for row in history]
    exported, base = load_file(os.path.join(summary["hf_model"], "model.safetensors")), load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    moved = [name for name, tensor in exported.items() if not torch.equal(tensor.float(), base[name].half().float())]
    assert len(moved) > len(exported) // 2, moved
