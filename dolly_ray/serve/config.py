"""What one served model is: the flags of jobs/serve.py and a Serve config file's ``args``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dolly_ray.cli import option

API_KEY_ENV = "DOLLY_RAY_API_KEY"


@dataclass
class ServeConfig:
    """One served model; jobs/serve.py flags and a Serve config file's ``args`` fill it."""

    model: str = option("", "the checkpoint's Hugging Face model directory (<checkpoint>/hf) or a hub id")
    model_name: str = option("", "name clients send as `model` and /v1/models lists; empty: the directory's name")
    engine: str = option("auto", "hf (transformers with continuous batching), vllm (vLLM through ray.serve.llm) or auto: vllm where vLLM is installed and replicas get GPUs")
    num_replicas: int = option(1, "replicas, each holding one copy of the model")
    autoscaling: dict = option({}, "Ray Serve autoscaling_config, e.g. {\"min_replicas\": 1, \"max_replicas\": 4}; replaces num_replicas")
    num_cpus_per_replica: float = option(1.0, "CPUs reserved per replica (fractions allowed)")
    num_gpus_per_replica: float = option(None, "GPUs per replica; null: 1 when the cluster has GPUs, else 0")
    max_batch_size: int = option(16, "most requests decoded together in the running batch; later ones wait for a place")
    kv_cache_gib: float | None = option(None, "KV-cache memory per replica; null: most of the free GPU memory, or 1 GiB on CPU")
    max_ongoing_requests: int = option(None, "requests a replica holds at once, queued or running; null: 2 x max batch size")
    max_new_tokens: int = option(256, "response length when a request does not say")
    max_new_tokens_limit: int = option(1024, "the most new tokens a request may ask for")
    max_request_bytes: int = option(1 << 20, "largest request body; larger ones get 413")
    api_key: str = option("", f"require `Authorization: Bearer KEY`; empty: ${API_KEY_ENV}, and no key when that is unset too")
    trust_remote_code: bool = option(False, "run model code from the model repository (only for models you trust)")
    allow_pickle: bool = option(False, "allow non-safetensors weights (pickle can run code)")

    @property
    def served_name(self) -> str:
        """The name clients send as ``model``."""
        return self.model_name or default_model_name(self.model)


def default_model_name(model: str) -> str:
    """The directory's name; for a training checkpoint's ``hf/`` folder, the checkpoint's."""
    path = Path(model.rstrip("/"))
    return path.parent.name if path.name == "hf" and path.parent.name else path.name
