"""A run is its settings: what defines a training run is saved in its folder when it
starts, and a rerun under the same storage path and name must agree with it.

Rerunning a run that has a checkpoint resumes it (or, finished, ends at once); with
settings that define another run (another model, dataset, learning rate, batching,
LoRA rank, ...) that would silently reuse the old weights and report wrong figures,
so the driver refuses it before anything is reserved, naming each setting that differs.
``MAY_CHANGE`` are the flags that say how a run is run, watched and kept rather than
what it trains; they may differ from one attempt to the next.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from dolly_ray import storage
from dolly_ray.cli import ConfigError
from dolly_ray.train.config import TrainConfig

logger = logging.getLogger(__name__)

SETTINGS_FILE = "dolly_ray_run.json"
CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train's checkpoint folders in a run's folder
MAY_CHANGE = frozenset(
    {
        # where it runs and how much it may use
        "storage_path", "name", "restart", "num_to_keep", "checkpoint_upload", "max_failures", "cpus_per_worker",
        "accelerator_type", "gpu_memory_gib", "gradient_checkpointing", "use_gpu",
        # when it stops, what it reports and how loudly
        "stop_after_steps", "log_every", "verbose", "eval_every", "eval_generate", "eval_generate_max_new_tokens",
        "checkpoint_every", "hf_model_every_checkpoint", "tensorboard_dir", "sample_prompts", "dry_run",
        # what it is allowed to load and how bad records are reported (the records kept are the same)
        "trust_remote_code", "allow_pickle", "strict_data",
    }
)  # fmt: skip


def defining(config: TrainConfig) -> dict[str, Any]:
    """The settings that make ``config`` the run it is, the dataset's fingerprint among them."""
    settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in MAY_CHANGE}
    settings["dataset_fingerprint"] = storage.fingerprint(config.dataset)
    return json.loads(json.dumps(settings))  # as it reads back from the file


def check_rerun(config: TrainConfig) -> dict[str, Any]:
    """Before anything is reserved: a run folder with a checkpoint must hold the same
    defining settings (``--restart`` deletes it first, to train afresh); otherwise they
    are written there, so the next attempt can be checked. Returns them (the dataset's
    fingerprint among them, which preparing the data takes rather than hashing again)."""
    run_dir = storage.join(config.storage_path, config.name)
    if config.restart:
        logger.info("--restart: deleting run %s", run_dir)
        storage.delete_dir(run_dir)  # nothing when it is not there
    settings = defining(config)
    saved = _read(run_dir)
    if saved is not None and saved != settings and any(d.startswith(CHECKPOINT_PREFIX) for d in storage.subdirs(run_dir)):
        changes = "; ".join(f"{key}: {_show(saved.get(key))} -> {_show(settings.get(key))}" for key in sorted(set(saved) | set(settings)) if saved.get(key) != settings.get(key))
        raise ConfigError(
            f"run {config.name!r} in {config.storage_path} was trained with other settings ({changes}); "
            "pass --name NAME for a new run, or --restart to delete this one and train it afresh"
        )
    if saved != settings:
        filesystem, where = storage.output_filesystem(storage.join(run_dir, SETTINGS_FILE))
        with filesystem.open_output_stream(where) as f:
            f.write(json.dumps(settings, indent=1, sort_keys=True).encode())
    return settings


def _read(run_dir: str) -> dict | None:
    location = storage.join(run_dir, SETTINGS_FILE)
    return json.loads(storage.read_text(location)) if storage.is_file(location) else None


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else repr(value)
