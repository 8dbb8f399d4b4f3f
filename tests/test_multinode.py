"""Several nodes and object storage on one machine: a two-node Ray cluster of hand-started
nodes and an S3-compatible server on 127.0.0.1, reached through the standard AWS variables.

Everything a later step needs travels through the bucket: the base model, the records,
checkpoints, TensorBoard logs, the exported model and the batch output. The jobs are
submitted with `ray job submit` and hand each other the locations they report, unedited.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from dolly_ray import storage, testing
from dolly_ray.batch.output import read_rows
from dolly_ray.generate.generator import GenerationParams, InstructionGenerator
from dolly_ray.records import tasks
from dolly_ray.train import checkpoint, prepared

pytestmark = [pytest.mark.multinode, pytest.mark.slow]

BUCKET = "runs"
STEPS = 8
CHECKPOINT_FILES = (".pt", ".safetensors", "history.jsonl")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The S3 server with the base model and the records in its bucket; this process
    points at it too, as a user's shell would."""
    server = testing.S3Server()
    saved = {key: os.environ.get(key) for key in server.env}
    os.environ.update(server.env)
    try:
        server.create_bucket(BUCKET)
        local = tmp_path_factory.mktemp("uploads")
        storage.upload_dir(str(testing.build_model(local / "base-model")), f"s3://{BUCKET}/base-model")
        records = tasks.generate(240, seed=11)
        tasks.write_jsonl(records, local / "train.jsonl")
        server.client().upload_file(str(local / "train.jsonl"), BUCKET, "data/train.jsonl")
        pq.write_table(pa.Table.from_pylist(records), local / "train.parquet")  # the same records
        server.client().upload_file(str(local / "train.parquet"), BUCKET, "data/train.parquet")
        questions = [{"id": i, "instruction": r["instruction"], "input": r["input"]} for i, r in enumerate(tasks.generate(12, seed=12))]
        pq.write_table(pa.Table.from_pylist(questions), local / "questions.parquet")
        server.client().upload_file(str(local / "questions.parquet"), BUCKET, "data/questions.parquet")
        server.questions = questions
        yield server
    finally:
        server.stop()
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="module")
def cluster(s3):
    """A head with 3 CPUs and a second node with 2: two 2-CPU training workers cannot
    share a node, and the head keeps a CPU for Ray Data. Nodes are declared dead after
    3 missed 1-second health checks."""
    root = Path(tempfile.mkdtemp(prefix="dr_mn_"))  # short: Ray's socket paths live under it
    health = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
    ray_cluster = testing.RayCluster(root, head_cpus=3, env=s3.env, head_env=health)
    try:
        ray_cluster.add_node("node2", cpus=2)
        yield ray_cluster
    finally:
        ray_cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def _train(cluster, job_id: str, name: str, *flags: str, data: str = "train.jsonl") -> dict:
    result = cluster.submit(
        job_id,
        "python", "jobs/train.py", "--preset", "cpu",
        "--model", f"s3://{BUCKET}/base-model", "--dataset", f"s3://{BUCKET}/data/{data}",
        "--num-workers", "2", "--cpus-per-worker", "2", "--max-steps", str(STEPS), "--micro-batch-size", "2",
        "--learning-rate", "8e-3", "--warmup-steps", "1", "--log-every", "1", "--checkpoint-every", "2",
        "--max-length", "128", "--eval-fraction", "0.1",
        "--storage-path", f"s3://{BUCKET}/dolly", "--tensorboard-dir", f"s3://{BUCKET}/tb", "--name", name, *flags,
    )  # fmt: skip
    logs = cluster.logs(job_id)
    assert result.returncode == 0 and cluster.status(job_id) == "succeeded", logs[-4000:]
    return testing.job_summary(logs)


def _checkpoint_files(node: testing.RayNode) -> list[Path]:
    return [path for folder in ("tmp", "work") for path in node.files(folder) if path.name.endswith(CHECKPOINT_FILES)]


@pytest.fixture(scope="module")
def clean_run(cluster):
    return _train(cluster, "train-clean", "clean")


def test_training_spans_two_nodes_and_keeps_everything_in_the_bucket(cluster, s3, clean_run):
    head, node2 = cluster.nodes
    assert sorted(clean_run["worker_nodes"]) == sorted([head.node_id, node2.node_id])
    assert clean_run["finished"] is True and clean_run["steps"] == STEPS

    # Every location is a URI another job takes as it is.
    checkpoint_uri = clean_run["checkpoint"]
    assert checkpoint_uri.startswith(f"s3://{BUCKET}/dolly/clean/checkpoint_")
    assert clean_run["hf_model"] == f"{checkpoint_uri}/hf"
    assert clean_run["loss_curve"] == f"{checkpoint_uri}/hf/loss_curve.png"
    assert clean_run["tensorboard"] == f"s3://{BUCKET}/tb/clean"

    keys = s3.keys(BUCKET)
    prefix = checkpoint_uri.removeprefix(f"s3://{BUCKET}/")
    checkpoints = {key.split("/")[2] for key in keys if key.startswith("dolly/clean/checkpoint_2")}
    assert len(checkpoints) == 2  # num_to_keep
    for rank in (0, 1):  # each worker's ZeRO-3 partition, uploaded from its own node
        assert f"{prefix}/deepspeed/state/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in keys
    for name in ("model.safetensors", "tokenizer.json", "config.json", "loss_curve.png"):
        assert f"{prefix}/hf/{name}" in keys
    assert any(key.startswith("tb/clean/events.out.tfevents") for key in keys)

    history = checkpoint.read_history(checkpoint_uri)
    assert [row["step"] for row in history] == list(range(1, STEPS + 1))
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"], [row["train_loss"] for row in history]
    saved = [row for row in history if "checkpoint_save_s" in row]
    assert [row["step"] for row in saved] == [2, 4, 6, 8]
    assert all(row["checkpoint_upload_s"] > 0 for row in saved[:-1])  # the last one's arrives with the next
    assert clean_run["checkpoint_save_s"] > 0 and clean_run["checkpoint_upload_s"] > 0

    # Nothing a later step needs stayed on a node: local checkpoint copies are gone once uploaded.
    assert _checkpoint_files(head) == [] and _checkpoint_files(node2) == []


class NodeKiller(threading.Thread):
    """Watches the run's checkpoint record in the bucket; once it lists ``at_step``, kills
    ``node`` (its raylet, workers and all, SIGKILL) and joins a replacement node."""

    def __init__(self, cluster, s3, run_name: str, node: testing.RayNode, at_step: int):
        super().__init__(daemon=True)
        self.cluster, self.s3, self.node, self.at_step = cluster, s3, node, at_step
        self.key = f"dolly/{run_name}/checkpoint_manager_snapshot.json"
        self.killed_at: float | None = None
        self.replacement: testing.RayNode | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def latest_step(self) -> int | None:
        try:
            body = self.s3.client().get_object(Bucket=BUCKET, Key=self.key)["Body"].read()
            latest = json.loads(body).get("latest_checkpoint_result")
        except Exception:  # not written yet
            return None
        return latest["metrics"]["step"] if latest else None

    def run(self):
        try:
            while not self.done.is_set():
                step = self.latest_step()
                if step is not None and step >= self.at_step:
                    self.node.kill()
                    self.killed_at = time.monotonic()
                    self.replacement = self.cluster.add_node("node3", cpus=2)
                    return
                time.sleep(0.2)
        except BaseException as e:  # seen by the test
            self.error = e


def test_a_lost_node_costs_only_time_and_a_stopped_run_resumes_from_the_bucket(cluster, s3, clean_run):
    """Read from Parquet, the same records as the clean run's JSONL: the same rows in the
    same order, so every step must match the clean run."""
    stopped = _train(cluster, "train-stop", "lossy", "--stop-after-steps", "4", data="train.parquet")
    assert stopped["steps"] == 4 and stopped["finished"] is False
    prepared_at = f"s3://{BUCKET}/dolly/{prepared.PREPARED_DIR}/{stopped['prepared_data']['key']}"
    assert stopped["prepared_data"]["location"] == prepared_at and stopped["prepared_data"]["reused"] is False
    assert any(key.startswith(prepared_at.removeprefix(f"s3://{BUCKET}/") + "/parts/") for key in s3.keys(BUCKET))

    head, node2 = cluster.nodes[:2]
    killer = NodeKiller(cluster, s3, "lossy", node2, at_step=6)
    killer.start()
    try:
        resumed = _train(cluster, "train-resume", "lossy", "--max-failures", "1", data="train.parquet")
        finished_at = time.monotonic()
    finally:
        killer.done.set()
        killer.join()
    assert killer.error is None and killer.replacement is not None, killer.error
    assert resumed["finished"] is True and resumed["steps"] == STEPS
    # Every attempt, the one that replaced the lost node's worker too, read the rows prepared in the bucket.
    assert resumed["prepared_data"]["reused"] is True and resumed["prepared_data"]["location"] == prepared_at
    assert sorted(resumed["worker_nodes"]) == sorted([head.node_id, killer.replacement.node_id])

    clean_history, history = checkpoint.read_history(clean_run["checkpoint"]), checkpoint.read_history(resumed["checkpoint"])
    assert [row["step"] for row in history] == list(range(1, STEPS + 1))
    for before, after in zip(clean_history, history, strict=True):
        assert after["train_loss"] == pytest.approx(before["train_loss"], rel=1e-4), after["step"]
        assert after["learning_rate"] == pytest.approx(before["learning_rate"], rel=1e-9)
    # The rerun started from the stopped run's step 4; after the kill, from the bucket's step 6.
    resumes = re.findall(r"rank \d resumed at step (\d+)", cluster.logs("train-resume"))
    assert sorted(set(resumes)) == ["4", "6"] and len(resumes) == 4, resumes
    print(f"node lost after step 6; the run finished {finished_at - killer.killed_at:.1f} s after the kill")
    assert _checkpoint_files(killer.replacement) == []


def test_the_reported_model_feeds_batch_generation_and_serve_unedited(cluster, s3, clean_run):
    hf_model = clean_run["hf_model"]
    output = f"s3://{BUCKET}/out/answers"
    result = cluster.submit(
        "batch",
        "python", "jobs/batch_generate.py", "--model", hf_model, "--input", f"s3://{BUCKET}/data/questions.parquet",
        "--output", output, "--num-actors", "2", "--num-cpus-per-actor", "1", "--max-new-tokens", "8", "--greedy",
    )  # fmt: skip
    logs = cluster.logs("batch")
    assert result.returncode == 0 and cluster.status("batch") == "succeeded", logs[-4000:]
    summary = testing.job_summary(logs)
    assert summary["output"] == output and summary["rows"] == len(s3.questions) and summary["errors"] == 0

    generator = InstructionGenerator.from_pretrained(hf_model, device="cpu")  # plain transformers, from the bucket
    prompts = [(q["instruction"], q["input"] or None) for q in s3.questions]
    expected = [r.response for r in generator.generate(prompts, GenerationParams(greedy=True, max_new_tokens=8))]
    rows = list(read_rows(output))
    assert [row["id"] for row in rows] == [q["id"] for q in s3.questions]
    assert [row["response"] for row in rows] == expected

    port = testing.free_port()
    started = cluster.ray_job(
        "submit", "--no-wait", "--working-dir", ".", "--submission-id", "serve", "--",
        "python", "jobs/serve.py", "--model", hf_model, "--port", str(port), "--max-new-tokens", "8", "--num-cpus-per-replica", "1",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:
        question = s3.questions[0]
        deadline = time.monotonic() + 240
        while True:
            try:
                reply = requests.post(
                    f"http://127.0.0.1:{port}/generate", json={"instruction": question["instruction"], "input": question["input"], "temperature": 0}, timeout=60
                )
                if reply.status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, cluster.logs("serve")[-4000:]
            time.sleep(2)
        assert reply.json()["response"] == expected[0]
    finally:
        cluster.ray_job("stop", "serve")
