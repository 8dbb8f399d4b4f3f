"""cluster.yaml passes Ray's own launcher validation; jobs run through `ray job submit`
on a real local Ray cluster, as users run them on a GPU cluster."""

from __future__ import annotations

import copy
import importlib.metadata
import shutil
import tempfile
import time
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from dolly_ray import testing
from dolly_ray.train import recipe, settle

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cluster_config():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_passes_ray_validation(cluster_config):
    validate_config(prepare_config(copy.deepcopy(cluster_config)))


def test_the_validation_catches_a_broken_config(cluster_config):
    broken = copy.deepcopy(cluster_config)
    broken["available_node_types"]["a10g_4x"]["min_wokers"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_wokers"):
        validate_config(prepare_config(broken))


def test_every_worker_type_is_a_gpu_node_named_by_its_accelerator(cluster_config):
    node_types = cluster_config["available_node_types"]
    workers = {name: node for name, node in node_types.items() if name != cluster_config["head_node_type"]}
    assert {node["node_config"]["InstanceType"].split(".")[0] for node in workers.values()} == {"g5", "p3"}
    for name, node in workers.items():
        resources = node["resources"]
        assert resources["GPU"] >= 1 and resources["CPU"] >= 1, name
        assert [key for key in resources if key.startswith("accelerator_type:")] in (["accelerator_type:A10G"], ["accelerator_type:V100"]), name
        assert node["min_workers"] <= node["max_workers"], name
    assert "GPU" not in node_types[cluster_config["head_node_type"]]["resources"]


def test_every_node_installs_this_version_of_the_project(cluster_config):
    version = importlib.metadata.version("dolly_ray")
    prepared = prepare_config(copy.deepcopy(cluster_config))
    wheel = f"dolly_ray-{version}-py3-none-any.whl"
    for commands in (prepared["head_setup_commands"], prepared["worker_setup_commands"]):
        assert any("pip install" in command and wheel in command for command in commands)
    assert "./dist" in cluster_config["file_mounts"].values()


def test_nothing_listens_beyond_the_head_nodes_localhost(cluster_config):
    text = (REPO / "cluster.yaml").read_text()
    assert "0.0.0.0" not in text
    assert any("--dashboard-host=127.0.0.1" in command for command in cluster_config["head_start_ray_commands"])


def test_auto_preset_settles_gpu_or_cpu_on_the_driver():
    def on_driver(cluster_gpus, **flags):
        config = recipe.TrainConfig(**{"preset": "auto", **flags})
        return settle.preset_on_driver(config.preset, config.use_gpu, config.accelerator_type, cluster_gpus)

    assert on_driver(cluster_gpus=0) == ("cpu", False)
    assert on_driver(cluster_gpus=8) == ("auto", True)  # the workers pick from their GPUs
    # Asking for GPUs waits for the autoscaler instead of falling back to the CPU.
    assert on_driver(0, accelerator_type="A10G")[1] is True
    assert on_driver(0, use_gpu=True)[1] is True
    assert on_driver(8, use_gpu=False)[0] == "cpu"
    assert on_driver(0, preset="v100")[0] == "v100"


# --- a real local cluster and `ray job submit` -------------------------------------


@pytest.fixture(scope="module")
def local_cluster():
    # Short path: Ray's Unix socket paths live under it and have a length limit.
    root = Path(tempfile.mkdtemp(prefix="dr_cluster_"))
    cluster = testing.RayCluster(root, head_cpus=2)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return testing.build_model(tmp_path_factory.mktemp("submitted-model"))


@pytest.mark.slow
def test_a_failing_job_ends_failed_with_its_one_line_error(local_cluster, model, tmp_path):
    missing = tmp_path / "absent.jsonl"
    failed = local_cluster.submit(
        "train-bad", "python", "jobs/train.py", "--preset", "cpu", "--model", str(model), "--dataset", str(missing), "--num-workers", "2", "--cpus-per-worker", "0.5"
    )  # fmt: skip
    assert failed.returncode != 0
    assert local_cluster.status("train-bad") == "failed"
    error_lines = [line for line in local_cluster.logs("train-bad").splitlines() if line.startswith("error:")]
    assert error_lines == [f"error: dataset not found: {missing}"]


def test_an_embedded_ray_cannot_grow_and_says_what_waits(ray_local):
    from ray.util.placement_group import placement_group, remove_placement_group

    from dolly_ray import cluster

    assert cluster.started_here() and not cluster.can_add_nodes()
    assert cluster.total("CPU") == cluster.largest_node("CPU") == ray_local.cluster_resources()["CPU"]
    waiting = placement_group([{"CPU": 64}])  # more than any node here has: it stays pending
    try:
        deadline = time.monotonic() + 60
        while not any("64" in demand for demand in cluster._pending_demands()) and time.monotonic() < deadline:
            time.sleep(1)
        assert any("64" in demand for demand in cluster._pending_demands()), cluster._pending_demands()
    finally:
        remove_placement_group(waiting)
