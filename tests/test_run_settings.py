"""A run is its settings: a rerun under the same storage path and name with other
settings is refused before anything is reserved, naming each setting that differs."""

import dataclasses
import json
import re

import pytest

from dolly_ray import storage, testing
from dolly_ray.cli import ConfigError
from dolly_ray.records import tasks
from dolly_ray.train import run_settings
from dolly_ray.train.config import TrainConfig

# A setting of each kind that defines a run, and a value other than the base's.
DEFINING = {
    "model": "other-org/other-model",
    "learning_rate": 3e-4,
    "max_length": 512,
    "batching": "pad",
    "micro_batch_size": 2,
    "num_workers": 4,
    "seed": 7,
    "epochs": 3,
    "max_steps": 100,
    "lora_r": 8,
    "preset": "a10",
    "columns": "dolly",
    "deepspeed": {"zero_optimization": {"reduce_bucket_size": 1000}},
}
# Flags that may change between attempts of one run.
ALLOWED = {"max_failures": 3, "stop_after_steps": 5, "log_every": 1, "tensorboard_dir": "tb", "cpus_per_worker": 1.5, "verbose": True, "eval_every": 7}


@pytest.fixture
def run(tmp_path):
    """A run's base config and a way to give it a checkpoint folder, as Ray Train writes them."""
    dataset = tasks.write_jsonl(tasks.generate(20, seed=0), tmp_path / "data.jsonl")
    base = TrainConfig(model="some-org/model", dataset=str(dataset), storage_path=str(tmp_path / "runs"), name="run", preset="cpu", micro_batch_size=4, num_workers=2)

    def add_checkpoint():
        (tmp_path / "runs" / "run" / "checkpoint_2026-12-04_00-00-00.000000").mkdir(parents=True)

    return base, add_checkpoint


def test_the_first_attempt_writes_its_settings_and_the_same_settings_pass_again(run):
    base, add_checkpoint = run
    run_settings.check_rerun(base)
    saved = json.loads(storage.read_text(storage.join(base.storage_path, base.name, run_settings.SETTINGS_FILE)))
    assert saved["learning_rate"] == base.learning_rate and len(saved["dataset_fingerprint"]) == 16
    assert not set(saved) & run_settings.MAY_CHANGE
    add_checkpoint()
    run_settings.check_rerun(base)
    run_settings.check_rerun(dataclasses.replace(base, **ALLOWED))


@pytest.mark.parametrize("name", sorted(DEFINING))
def test_a_rerun_with_another_defining_setting_is_refused_naming_it(run, name):
    base, add_checkpoint = run
    run_settings.check_rerun(base)
    add_checkpoint()
    changed = dataclasses.replace(base, **{name: DEFINING[name]})
    with pytest.raises(ConfigError) as refused:
        run_settings.check_rerun(changed)
    message = str(refused.value)
    old, new = (json.dumps(v) if not isinstance(v, str) else repr(v) for v in (getattr(base, name), DEFINING[name]))
    assert f"({name}: {old} -> {new}); pass --name NAME for a new run, or --restart" in message, message
    assert message.startswith(f"run 'run' in {base.storage_path} was trained with other settings")


def test_the_same_path_with_other_records_is_another_dataset(run, tmp_path):
    base, add_checkpoint = run
    run_settings.check_rerun(base)
    add_checkpoint()
    tasks.write_jsonl(tasks.generate(20, seed=1), base.dataset)  # the demo rewrites its data for each seed
    with pytest.raises(ConfigError, match=r"\(dataset_fingerprint: '[0-9a-f]{16}' -> '[0-9a-f]{16}'\)"):
        run_settings.check_rerun(base)
    tasks.write_jsonl(tasks.generate(20, seed=0), base.dataset)  # the same records again: the same run
    run_settings.check_rerun(base)


def test_restart_deletes_the_old_run_and_other_settings_without_a_checkpoint_start_afresh(run):
    base, add_checkpoint = run
    run_settings.check_rerun(base)
    add_checkpoint()
    restarted = dataclasses.replace(base, learning_rate=1e-3, restart=True)
    run_settings.check_rerun(restarted)
    assert storage.subdirs(storage.join(base.storage_path, base.name)) == []  # the old checkpoint is gone
    run_settings.check_rerun(dataclasses.replace(base, learning_rate=2e-3))  # no checkpoint yet: nothing to reuse
    saved = json.loads(storage.read_text(storage.join(base.storage_path, base.name, run_settings.SETTINGS_FILE)))
    assert saved["learning_rate"] == 2e-3


def test_the_settings_file_lives_in_object_storage_too(tmp_path):
    """The same check through pyarrow's filesystems, with a URI storage path (file://)."""
    dataset = tasks.write_jsonl(tasks.generate(5, seed=0), tmp_path / "d.jsonl")
    config = testing.cpu_train_config("m", dataset, (tmp_path / "runs").as_uri(), "uri-run")
    run_settings.check_rerun(config)
    (tmp_path / "runs" / "uri-run" / "checkpoint_x").mkdir()
    with pytest.raises(ConfigError, match=re.escape("seed: 42 -> 1")):
        run_settings.check_rerun(dataclasses.replace(config, seed=1))
