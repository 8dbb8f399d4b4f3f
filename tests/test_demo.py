"""The demo as a person runs it, at a small size: the fast lane's one whole path (train,
export, reload, answer), its console, a second seed, and the LoRA path."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from dolly_ray import demo

ROOT = Path(__file__).resolve().parent.parent
PROGRESS = re.compile(r"step (\d+)/(\d+) \(\d+%\) loss [\d.]+ lr [\d.e+-]+ [\d,]+ tokens/s elapsed \d+:\d\d:\d\d eta \d+:\d\d:\d\d")
# Lines the console used to flood with, each from a dependency or Ray Train's own echo.
NOISE = ("FutureWarning", "UserWarning", "Reporting training result", "Checkpoint successfully created", "Execution plan of Dataset",
         "generation flags are not valid", "Setting accelerator to CPU", "Using default tokenizer")


SMALL = {"num_train": 200, "num_heldout": 8}


@pytest.fixture(scope="module")
def first_demo(ray_local, tmp_path_factory):
    """The README's demo command at a small size, joined to the session's Ray as
    `ray job submit` would join a cluster: its output folder and every line it printed."""
    output = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in SMALL.items()]
    result = subprocess.run(
        [sys.executable, "jobs/demo.py", "--output-dir", str(output), *flags], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return output, result


def test_the_demos_console_is_short_and_shows_progress_and_the_summary(first_demo):
    _, result = first_demo
    lines = (result.stderr + result.stdout).splitlines()
    assert len(lines) < 80, "\n".join(lines)
    assert not [line for line in lines if any(noise in line for noise in NOISE)], "\n".join(lines)
    progress = [PROGRESS.search(line) for line in lines if PROGRESS.search(line)]
    assert progress and progress[-1][1] == progress[-1][2], "\n".join(lines)  # the last line is the last step's
    assert re.search(r"^exact_match: \d\.\d\d$", result.stdout, re.M)
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["steps"] == int(progress[-1][1]) and summary["finished"] is True
    # The whole path ran: the exported model reloaded with plain transformers answered.
    assert AutoModelForCausalLM.from_pretrained(summary["hf_model"]) is not None
    assert len(re.findall(r"^\[(ok |MISS)\] ", result.stdout, re.M)) == SMALL["num_heldout"]


@pytest.mark.slow
def test_another_seed_in_the_same_folder_trains_a_run_of_its_own(first_demo):
    """The seed study: seed 1 must not come back with seed 0's finished run."""
    output, result = first_demo
    first = json.loads(result.stdout.splitlines()[-1])
    second = demo.run(demo.DemoConfig(output_dir=str(output), seed=1, **SMALL))
    assert Path(first["checkpoint"]).parent.name == "demo-seed0" and Path(second["checkpoint"]).parent.name == "demo-seed1"
    assert second["finished"] is True and second["train_loss"] != first["train_loss"]  # trained, on its own records
    assert Path(first["checkpoint"]).is_dir()  # the first seed's run is kept


@pytest.mark.slow
def test_the_lora_demo_trains_a_base_then_adapters(ray_local, tmp_path):
    summary = demo.run(demo.DemoConfig(output_dir=str(tmp_path), lora_r=8, base_records=400, lora_records=400, num_heldout=8))
    assert Path(summary["checkpoint"]).parent.name == "demo-lora8-seed0" and Path(summary["base_model"]).parts[-3] == "base-seed0"
    assert 0 <= summary["base_exact_match"] <= 1 and 0 <= summary["exact_match"] <= 1
    assert (Path(summary["adapter"]) / "adapter_model.safetensors").is_file() and summary["finished"] is True
