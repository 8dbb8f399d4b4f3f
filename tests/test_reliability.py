"""Worker loss mid-training: a killed worker costs nothing but time."""

import json
import os
import signal
import threading
import time

import psutil
import pytest
from safetensors.torch import load_file

from dolly_ray.train import checkpoint, recipe


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
def test_training_survives_three_worker_kills_without_retraining_a_record(reference_run):
    """Three workers SIGKILLed mid-epoch; the run restarts from its latest checkpoint each time.

    Every optimizer step is compared with an uninterrupted run of the same config: the
    loss of each step and the final weights. Training any micro-batch twice after a
    restore (or skipping one) would change the loss of the steps that follow and the
    weights, so equality is the proof that each record after the restore point was
    trained exactly once.
    """
    clean = reference_run.summary
    killer = WorkerKiller(reference_run.storage / "faulty", kills=3, before_step=10)
    killer.start()
    try:
        faulty = recipe.run(reference_run.config("faulty", max_failures=3))
    finally:
        killer.done.set()
        killer.join()

    assert killer.killed == [3, 6, 9], killer.steps
    # Each restart resumed at the checkpoint it was killed after: the registered steps
    # only ever grow (a restart from scratch would register step 3 again).
    assert killer.steps == sorted(set(killer.steps)) and killer.steps[-1] == 20, killer.steps
    assert faulty["finished"] is True and faulty["steps"] == clean["steps"] == 20  # 10 steps per epoch: the kills were mid-epoch

    clean_history, faulty_history = checkpoint.read_history(clean["checkpoint"]), checkpoint.read_history(faulty["checkpoint"])
    assert [row["step"] for row in faulty_history] == list(range(1, 21))
    for before, after in zip(clean_history, faulty_history, strict=True):
        assert after["train_loss"] == pytest.approx(before["train_loss"], rel=1e-4), after["step"]
        assert after["learning_rate"] == pytest.approx(before["learning_rate"], rel=1e-9)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(faulty["hf_model"])  # plain transformers
    clean_weights = load_file(os.path.join(clean["hf_model"], "model.safetensors"))
    loaded = model.state_dict()
    for name, tensor in clean_weights.items():
        assert (tensor.float() - loaded[name].float()).abs().max() < 1e-5, name
