"""Worker loss mid-training, and the safe loading defaults (safetensors only, no remote code)."""

import json
import os
import shutil
import signal
import threading
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from dolly_ray import batch, checkpoint, tasks, testing, train
from dolly_ray.generation import InstructionGenerator


class WorkerKiller(threading.Thread):
    """SIGKILLs a Ray Train worker process each time the run registers a new checkpoint.

    Workers are found among this process's descendants (the local Ray the tests
    started), never elsewhere on the machine. A checkpoint counts once Ray Train lists
    it as the run's latest (its checkpoint manager snapshot in storage): a checkpoint
    directory still being uploaded would not be restored from. ``steps`` records the
    step of every registered checkpoint seen, in order.
    """

    def __init__(self, run_dir, kills: int, before_step: int):
        super().__init__(daemon=True)
        self.snapshot = os.path.join(run_dir, "checkpoint_manager_snapshot.json")
        self.kills, self.before_step = kills, before_step
        self.killed: list[int] = []  # the checkpoint step at each kill
        self.steps: list[int] = []
        self.done = threading.Event()

    def latest_step(self):
        try:
            with open(self.snapshot) as f:
                latest = json.load(f).get("latest_checkpoint_result")
        except (OSError, ValueError):  # not written yet, or being rewritten
            return None
        return latest["metrics"]["step"] if latest else None

    @staticmethod
    def workers():
        found = []
        for process in psutil.Process().children(recursive=True):
            try:
                if process.cmdline()[:1] and process.cmdline()[0].startswith("ray::RayTrainWorker"):
                    found.append(process)
            except psutil.Error:  # exited meanwhile
                pass
        return found

    def run(self):
        while not self.done.is_set():
            step = self.latest_step()
            if step is not None and (not self.steps or step != self.steps[-1]):
                self.steps.append(step)
                workers = self.workers()
                if len(self.killed) < self.kills and step < self.before_step and workers:
                    workers[len(self.killed) % len(workers)].send_signal(signal.SIGKILL)
                    self.killed.append(step)
            time.sleep(0.1)


@pytest.mark.slow
def test_training_survives_three_worker_kills_without_retraining_a_record(ray_local, tiny_model_dir, tmp_path):
    """Three workers SIGKILLed mid-epoch; the run restarts from its latest checkpoint each time.

    Every optimizer step is compared with an uninterrupted run of the same config: the
    loss of each step and the final weights. Training any micro-batch twice after a
    restore (or skipping one) would change the loss of the steps that follow and the
    weights, so equality is the proof that each record after the restore point was
    trained exactly once.
    """
    dataset = tasks.write_jsonl(tasks.generate(200, seed=5), tmp_path / "tasks.jsonl")

    def config(name, **overrides):
        return testing.cpu_train_config(
            tiny_model_dir,
            dataset,
            tmp_path,
            name,
            max_steps=12,  # inside the first epoch
            micro_batch_size=2,
            learning_rate=2e-3,
            warmup_steps=3,
            log_every=1,
            checkpoint_every=3,
            **overrides,
        )

    clean = train.run(config("clean"))
    killer = WorkerKiller(tmp_path / "faulty", kills=3, before_step=12)
    killer.start()
    try:
        faulty = train.run(config("faulty", max_failures=3))
    finally:
        killer.done.set()
        killer.join()

    assert killer.killed == [3, 6, 9], killer.steps
    # Each restart resumed at the checkpoint it was killed after: the registered steps
    # only ever grow (a restart from scratch would register step 3 again).
    assert killer.steps == sorted(set(killer.steps)) and killer.steps[-1] == 12, killer.steps
    assert faulty["finished"] is True and faulty["steps"] == clean["steps"] == 12
    assert faulty["epoch"] < 1  # the kills were mid-epoch

    clean_history, faulty_history = checkpoint.read_history(clean["checkpoint"]), checkpoint.read_history(faulty["checkpoint"])
    assert [row["step"] for row in faulty_history] == list(range(1, 13))
    for before, after in zip(clean_history, faulty_history):
        assert after["train_loss"] == pytest.approx(before["train_loss"], rel=1e-4), after["step"]
        assert after["learning_rate"] == pytest.approx(before["learning_rate"], rel=1e-9)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(faulty["hf_model"])  # plain transformers
    clean_weights = load_file(os.path.join(clean["hf_model"], "model.safetensors"))
    loaded = model.state_dict()
    for name, tensor in clean_weights.items():
        assert (tensor.float() - loaded[name].float()).abs().max() < 1e-5, name


# --- safe loading defaults ----------------------------------------------------------


def _pickle_only_copy(model_dir, path):
    from transformers import AutoModelForCausalLM

    shutil.copytree(model_dir, path)
    torch.save(AutoModelForCausalLM.from_pretrained(model_dir).state_dict(), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    return str(path)


def test_pickle_weights_are_refused_unless_allowed(tiny_model_dir, tmp_path):
    pickled = _pickle_only_copy(tiny_model_dir, tmp_path / "pickled")
    with pytest.raises(OSError):
        InstructionGenerator.from_pretrained(pickled)
    config = train.TrainConfig(model=pickled, dataset="unused.jsonl", preset="cpu")
    with pytest.raises(ValueError, match="no safetensors weights.*--allow-pickle"):
        train.run(config)  # refused on the driver, before any data or worker
    with pytest.raises(batch.BatchError, match="no safetensors weights.*--allow-pickle"):
        batch.check(batch.BatchConfig(model=pickled, input=tiny_model_dir, output=str(tmp_path / "out.jsonl")))

    train.check_model(train.TrainConfig(model=pickled, preset="cpu", allow_pickle=True))
    batch.check(batch.BatchConfig(model=pickled, input=tiny_model_dir, output=str(tmp_path / "out.jsonl"), allow_pickle=True))
    assert InstructionGenerator.from_pretrained(pickled, allow_pickle=True).model.config.n_layer == 2


CUSTOM_CODE = """
from transformers import GPTJConfig, GPTJForCausalLM

open({marker!r}, "w").write("custom code ran")


class CustomConfig(GPTJConfig):
    model_type = "dolly_ray_custom"


class CustomModel(GPTJForCausalLM):
    config_class = CustomConfig
"""


def _custom_code_copy(model_dir, path, marker, model_type):
    shutil.copytree(model_dir, path)
    (path / "custom_code.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "custom_code.CustomConfig", "AutoModelForCausalLM": "custom_code.CustomModel"}
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def test_remote_code_is_refused_without_trust_remote_code(tiny_model_dir, tmp_path):
    marker = tmp_path / "code_ran"
    custom = _custom_code_copy(tiny_model_dir, tmp_path / "custom", marker, "dolly_ray_custom")
    with pytest.raises(ValueError, match="trust_remote_code"):
        InstructionGenerator.from_pretrained(custom)
    with pytest.raises(ValueError, match="cannot load model.*custom code"):
        train.run(train.TrainConfig(model=custom, dataset="unused.jsonl", preset="cpu"))
    with pytest.raises(batch.BatchError, match="cannot load model.*custom code"):
        batch.check(batch.BatchConfig(model=custom, input=tiny_model_dir, output=str(tmp_path / "out.jsonl")))
    # A known model type with custom code beside it loads the built-in class instead.
    known = _custom_code_copy(tiny_model_dir, tmp_path / "known", marker, "gptj")
    assert type(InstructionGenerator.from_pretrained(known).model).__name__ == "GPTJForCausalLM"
    assert not marker.exists()  # no custom code ran on the way

    generator = InstructionGenerator.from_pretrained(custom, trust_remote_code=True)
    assert type(generator.model).__name__ == "CustomModel" and marker.exists()  # the flag is what lets it run
