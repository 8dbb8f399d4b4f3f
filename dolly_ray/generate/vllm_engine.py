"""The ``vllm`` engine: vLLM through Ray's own LLM libraries, for GPU clusters.

Which engine a job runs, whether vLLM can load its model, and the engine settings the
Serve app (``serve.vllm_app``) and the batch job's processor (``batch.vllm_processor``)
share: resources that fit the cluster, and float32 with a bounded KV cache on CPU.

vLLM is not a dependency of the project (its builds pin their own torch and
transformers): ``make setup-vllm`` builds ``.venv-vllm`` with vLLM's CPU build, and a
GPU cluster installs ``vllm``.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

from dolly_ray import storage
from dolly_ray.cli import ConfigError

ENGINES = ("auto", "hf", "vllm")
CPU_KV_CACHE_GIB = 1  # vLLM's CPU backend would otherwise take most of the machine's RAM


def choose(engine: str, num_gpus: float) -> str:
    """``hf`` or ``vllm``: ``auto`` takes vllm where it is installed and the job has GPUs."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    installed = importlib.util.find_spec("vllm") is not None
    if engine == "auto":
        return "vllm" if installed and num_gpus > 0 else "hf"
    if engine == "vllm" and not installed:
        raise ConfigError("--engine vllm needs vLLM in this Python environment: `make setup-vllm` builds .venv-vllm (CPU); on GPU nodes `pip install vllm`")
    return engine


def check_model(model: str) -> None:
    """vLLM loads a local directory or a hub id itself, on whichever node runs the engine."""
    if storage.is_uri(model):
        raise ConfigError(f"--engine vllm loads a local directory or a hub id, not {model}: copy the model to storage every node mounts, or use --engine hf")


def engine_settings(num_gpus: float, num_cpus: float, max_num_seqs: int, kv_cache_gib: float | None) -> dict[str, Any]:
    """vLLM engine arguments, its environment and its placement: on CPU in float32 (what
    transformers generates in, so greedy answers agree) with a bounded KV cache."""
    engine_kwargs: dict[str, Any] = {"max_num_seqs": max_num_seqs}
    env: dict[str, str] = {}
    if num_gpus > 0:
        placement = {"bundles": [{"GPU": num_gpus, "CPU": num_cpus}]}
        if kv_cache_gib is not None:
            engine_kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
    else:
        # Without a placement of CPUs the engine actor asks Ray for a GPU and never starts.
        placement = {"bundles": [{"CPU": num_cpus}]}
        engine_kwargs.update(dtype="float32", enforce_eager=True)
        env["VLLM_CPU_KVCACHE_SPACE"] = str(math.ceil(kv_cache_gib or CPU_KV_CACHE_GIB))  # whole GiB
    return {"engine_kwargs": engine_kwargs, "runtime_env": {"env_vars": env}, "placement_group_config": placement}
