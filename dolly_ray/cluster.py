"""The Ray cluster a job runs on: joining or starting it, what it has, and whether a request fits.

Every job starts or joins Ray here and checks here, before it reserves anything, that
what it asks for (workers, actors, replicas, each with CPUs and GPUs) can ever be
granted: a cluster that cannot grant it and cannot add nodes fails the job at once with
the numbers and the flag to change, instead of leaving it waiting for ever. On an
autoscaling cluster the job waits instead, and what it waits for is logged every minute.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import threading
from dataclasses import dataclass
from typing import Iterator

from dolly_ray.cli import ConfigError

logger = logging.getLogger(__name__)

# The autoscaler's config on the head node of a `ray up` cluster.
BOOTSTRAP_CONFIG = os.path.join("~", "ray_bootstrap_config.yaml")
# Ray Data's read and map tasks each take a CPU; one must stay free beside the job's actors.
DATA_CPUS = 1.0
PENDING_LOG_INTERVAL_S = 60.0


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), else start a local
    Ray; nothing when this process already joined one (a notebook, a test session).

    Progress bars are drawn only on a terminal: in a log file (`ray job logs`, `2>&1`)
    their control characters would land among the job's lines.
    """
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init()
    if not sys.stderr.isatty():
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.enable_operator_progress_bars = False


def started_here() -> bool:
    """Whether this process started the Ray it uses (an embedded local Ray) rather than
    joining a running cluster."""
    import ray

    node = ray._private.worker._global_node
    return bool(node is not None and node.is_head())


def can_add_nodes() -> bool:
    """Whether an autoscaler may add nodes: a cluster launched by `ray up` (its head holds
    the autoscaling config) or one whose nodes carry configured node-type names (KubeRay).
    An embedded Ray or a cluster of hand-started nodes cannot grow."""
    if started_here():
        return False
    bootstrap = os.path.expanduser(BOOTSTRAP_CONFIG)
    if os.path.exists(bootstrap):
        import yaml

        with open(bootstrap) as f:
            config = yaml.safe_load(f) or {}
        node_types = config.get("available_node_types", {}).values()
        return bool(config.get("max_workers", 0) or any(t.get("max_workers", 0) for t in node_types))
    status = _cluster_status()
    # Nodes Ray started without a config are named node_<id>; configured ones by their type.
    return status is not None and any(not n.ray_node_type_name.startswith("node_") for n in status.active_nodes + status.idle_nodes)


def total(resource: str) -> float:
    """How much of ``resource`` (CPU, GPU, ...) the cluster's nodes have now; none while
    this process has joined no Ray."""
    import ray

    return ray.cluster_resources().get(resource, 0.0) if ray.is_initialized() else 0.0


def largest_node(resource: str) -> float:
    """The most of ``resource`` any one alive node has: a worker, actor or replica runs on one node."""
    import ray

    return max((node["Resources"].get(resource, 0.0) for node in ray.nodes() if node["Alive"]), default=0.0)


def gpus_per_actor(requested: float | None) -> float:
    """GPUs for each batch-generation actor or Serve replica: as requested, else one when
    the cluster has GPUs and none when it has not."""
    if requested is not None:
        return requested
    return 1.0 if total("GPU") > 0 else 0.0


def cpus_each(requested: float | None, count: int, default: float) -> float:
    """CPUs for each of ``count`` workers or actors: as requested; else ``default``, or on a
    local Ray this job started, an equal share (at most ``default``) of the CPUs Ray Data's
    tasks leave free."""
    if requested is not None:
        return requested
    if not started_here():
        return default
    free = max(total("CPU") - DATA_CPUS, 0.0)
    return max(min(default, math.floor(100 * free / count) / 100), 0.01)


@dataclass
class Request:
    """What a job reserves: ``count`` alike units (workers, actors, replicas), each needing
    ``each`` resources on one node, and ``beside`` CPUs that must stay free for Ray Data."""

    unit: str  # "worker", "actor", "replica"
    count: int
    count_flag: str  # the flag that sets ``count``
    each: dict[str, float]
    # resource -> how to ask for less of it; "{fits}" becomes the most each unit can have
    fixes: dict[str, str]
    beside: float = 0.0


def check_fits(request: Request) -> None:
    """Raise ConfigError, with the numbers and the flag to change, when ``request`` can never
    be granted: more than the cluster has in all or on any one node, and no autoscaler to
    add nodes. On a cluster that can grow, the job waits instead (see ``log_pending``)."""
    if can_add_nodes():
        return
    for resource, each in request.each.items():
        beside = request.beside if resource == "CPU" else 0.0
        have, node_max = total(resource), largest_node(resource)
        if each <= 0 or request.count <= 0 or (request.count * each + beside <= have and each <= node_max):
            continue
        plural = "s" if request.count != 1 else ""
        asked = f"{request.count} {request.unit}{plural} x {each:g} {resource} = {request.count * each:g} {resource}"
        if beside:
            asked += f", plus {beside:g} CPU for Ray Data to read the input,"
        where = f"this cluster has {have:g} {resource}" + (f", at most {node_max:g} on one node," if each > node_max else "")
        fits = math.floor(100 * min((have - beside) / request.count, node_max)) / 100
        fix = request.fixes[resource].format(fits=f"{max(fits, 0):g}")
        if fits <= 0 and resource == "CPU":
            fix = f"it needs a node with more than {beside:g} CPU"
        raise ConfigError(f"{asked} but {where} and cannot add nodes; {fix}")


def gpu_type() -> str:
    """The accelerator type of the cluster's GPUs (e.g. A10G) when there is exactly one, else ""."""
    import ray

    kinds = [key.split(":", 1)[1] for key in ray.cluster_resources() if key.startswith("accelerator_type:")] if ray.is_initialized() else []
    return kinds[0] if len(kinds) == 1 else ""


def node_memory_gib() -> float:
    """The RAM of the largest node Ray schedules on (its ``memory`` resource), in GiB."""
    return largest_node("memory") / 2**30


@contextlib.contextmanager
def log_pending(what: str) -> Iterator[None]:
    """While the block runs, log every minute what the cluster has not granted yet (on an
    autoscaling cluster, what it is adding nodes for), so a waiting job says why."""
    done = threading.Event()

    def watch() -> None:
        while not done.wait(PENDING_LOG_INTERVAL_S):
            pending = _pending_demands()
            if pending:
                logger.info("%s is waiting for resources: %s", what, "; ".join(pending))

    thread = threading.Thread(target=watch, name="dolly_ray.log_pending", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()


def _cluster_status():
    import ray
    from ray.autoscaler.v2.sdk import get_cluster_status

    try:
        return get_cluster_status(ray.get_runtime_context().gcs_address)
    except Exception as e:  # an older GCS or none reachable: nothing to report
        logger.debug("no cluster status: %s", e)
        return None


def _pending_demands() -> list[str]:
    status = _cluster_status()
    if status is None:
        return []
    demands = status.resource_demands
    pending = [f"{b.count} x {dict(b.bundle)}" for d in demands.ray_task_actor_demand for b in d.bundles_by_count]
    pending += [f"placement group {d.strategy} {[dict(b.bundle) for b in d.bundles_by_count]}" for d in demands.placement_group_demand]
    return pending
