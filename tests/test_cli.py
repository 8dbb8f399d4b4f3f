"""Entry points: flags generated from the config, YAML precedence, one-line errors."""

import argparse
import json
import os
import re
import subprocess
import sys
import time

import pytest

from dolly_ray import cli, testing
from dolly_ray.records import tasks
from dolly_ray.train import recipe, settle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse(argv):
    parser = argparse.ArgumentParser()
    cli.add_config_flags(parser, recipe.TrainConfig)
    return cli.config_from_args(recipe.TrainConfig, parser.parse_args(argv))


def test_defaults_are_the_real_thing():
    config = _parse([])
    # use_gpu stays open under preset auto until the cluster is known (train.settle.preset_on_driver).
    assert (config.model, config.dataset, config.preset, config.use_gpu) == ("EleutherAI/gpt-j-6B", "tatsu-lab/alpaca", "auto", None)


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: cpu\nnum-workers: 2\nlearning_rate: 0.001\ndeepspeed:\n  gradient_clipping: 0.5\n")
    config = _parse(["--config", str(path), "--num-workers", "3", "--no-strict-data"])
    assert config.preset == "cpu" and config.use_gpu is False
    assert config.num_workers == 3 and config.learning_rate == 0.001
    assert config.deepspeed == {"gradient_clipping": 0.5}
    assert _parse(["--deepspeed", '{"gradient_clipping": 2}', "--preset", "v100"]).deepspeed == {"gradient_clipping": 2}


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("preset: [cpu\n", "is not valid YAML"),
        ("- cpu\n", "must hold a mapping"),
        ("presett: cpu\n", "unknown option(s) ['presett']"),
    ],
)
def test_bad_yaml_is_a_config_error(tmp_path, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(cli.ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        _parse(["--config", str(path)])


def _run_job(*args, timeout=180):
    return subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "train.py"), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_help_lists_every_flag_with_its_default():
    result = _run_job("--help")
    assert result.returncode == 0
    help_text = "".join(result.stdout.split())  # argparse wraps lines, even inside values
    for flag in ("--model", "--dataset", "--preset", "--num-workers", "--use-gpu", "--storage-path", "--name", "--epochs", "--max-steps", "--max-length", "--config"):
        assert flag in help_text
    for default in ('"EleutherAI/gpt-j-6B"', '"tatsu-lab/alpaca"', '"auto"'):
        assert f"(default:{default})" in help_text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "h100"], "error: unknown preset 'h100'"),
        (["--preset", "cpu", "--use-gpu"], "error: preset 'cpu' is for CPU-only runs"),
        (["--preset", "cpu", "--accelerator-type", "A10G"], "error: accelerator_type 'A10G' selects GPUs"),
        (["--preset", "a100", "--no-use-gpu"], "error: preset 'a100' keeps Adam on the GPU and cannot run on CPUs"),
        (["--cpus-per-worker", "0"], "error: --cpus-per-worker must be at least 0.01, got 0.0"),
        (["--config", "no-such-file.yaml"], "error: cannot read config no-such-file.yaml"),
    ],
)
def test_bad_arguments_print_one_line(args, message, monkeypatch):
    monkeypatch.chdir(ROOT)
    done = testing.run_job_here("train", args)  # test_missing_dataset_prints_one_line runs the script
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and done.stderr.startswith(message)


def test_missing_dataset_prints_one_line(tmp_path, tiny_model_dir):
    """Refused before Ray starts: nothing waits on a cluster for a file that is not there."""
    env = {**os.environ, "RAY_ADDRESS": "local"}
    result = subprocess.run(
        [sys.executable, "jobs/train.py", "--preset", "cpu", "--model", tiny_model_dir, "--dataset", str(tmp_path / "absent.jsonl"), "--storage-path", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: dataset not found: {tmp_path / 'absent.jsonl'}"]
    assert "Started a local Ray instance" not in result.stderr


def test_a_request_the_cluster_cannot_grant_fails_fast(ray_local, tiny_model_dir, tmp_path):
    """On the embedded local Ray (the session's), which cannot add nodes."""
    dataset = tasks.write_jsonl(tasks.generate(20, seed=1), tmp_path / "tasks.jsonl")
    start = time.monotonic()
    result = testing.run_job_here(
        "train",
        ["--preset", "cpu", "--model", tiny_model_dir, "--dataset", str(dataset), "--num-workers", "2", "--cpus-per-worker", "64",
         "--storage-path", str(tmp_path / "runs")],
    )  # fmt: skip
    assert result.returncode == 2 and time.monotonic() - start < 60
    [error] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    match = re.fullmatch(
        r"error: 2 workers x 64 CPU = 128 CPU but this cluster has (\d+) CPU, at most \d+ on one node, and cannot add nodes; "
        r"pass --cpus-per-worker ([\d.]+) or fewer workers \(--num-workers\)",
        error,
    )
    assert match and float(match[2]) == int(match[1]) / 2, error
    assert not (tmp_path / "runs").exists()  # refused before anything was reserved or written


def test_an_embedded_ray_gives_workers_the_cpus_ray_data_leaves(ray_local, tiny_model_dir):
    config = recipe.TrainConfig(model=tiny_model_dir, preset="cpu", num_workers=2)
    settled, memory = settle.settle(config)
    assert settled.cpus_per_worker == (ray_local.cluster_resources()["CPU"] - 1) / 2
    assert (settled.micro_batch_size, settled.gradient_checkpointing) == (8, False) and memory.fits
    kept = settle.settle(recipe.TrainConfig(model=tiny_model_dir, preset="cpu", cpus_per_worker=1.5, micro_batch_size=3))[0]
    assert (kept.cpus_per_worker, kept.micro_batch_size) == (1.5, 3)


@pytest.mark.slow
def test_the_train_job_with_default_cpus_trains_and_ends_with_its_summary(tiny_model_dir, tmp_path):
    """The command that used to wait for ever: 2 workers on a local Ray, no --cpus-per-worker."""
    dataset = tasks.write_jsonl(tasks.generate(60, seed=1), tmp_path / "tasks.jsonl")
    summary_file = tmp_path / "out" / "summary.json"
    env = {**os.environ, "RAY_ADDRESS": "local"}
    result = subprocess.run(
        [sys.executable, "jobs/train.py", "--preset", "cpu", "--model", tiny_model_dir, "--dataset", str(dataset), "--num-workers", "2",
         "--max-steps", "2", "--max-length", "128", "--storage-path", str(tmp_path / "runs"), "--summary-file", str(summary_file)],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["finished"] is True and summary["steps"] == 2
    assert summary["cpus_per_worker"] < 1 and summary["micro_batch_size"] == 8
    assert summary_file.read_text() == result.stdout.splitlines()[-1] + "\n"
