"""The ``vllm`` engine: vLLM through Ray's own LLM libraries, for GPU clusters.

Serve builds a ``ray.serve.llm`` OpenAI app and the batch job a ``ray.data.llm``
processor, both on the exported checkpoint: its chat template writes the Dolly prompt
for chat requests and its generation config stops at ``### End``. What this module adds
is the project's behaviour around them: the same API-key and body-size gate as the hf
server, the batch job's one output row per input row (a bad row keeps its ``error``),
the same prompt truncation and response cut, and resources that fit the cluster.

vLLM is not a dependency of the project (its builds pin their own torch and
transformers): ``make setup-vllm`` builds ``.venv-vllm`` with vLLM's CPU build, and a
GPU cluster installs ``vllm``.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from typing import TYPE_CHECKING, Any

from dolly_ray import openai_api, prompts, storage
from dolly_ray.cli import ConfigError

if TYPE_CHECKING:
    from dolly_ray.batch_generate import BatchConfig
    from dolly_ray.serve import ServeConfig

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


def _engine_settings(num_gpus: float, num_cpus: float, max_num_seqs: int, kv_cache_gib: float | None) -> dict[str, Any]:
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


# --- Serve ----------------------------------------------------------------------------


def serve_app(config: "ServeConfig", api_key: str, num_gpus: float):
    """A ``ray.serve.llm`` OpenAI app behind ``openai_api.Gate``.

    ``build_openai_app`` builds Ray's ingress app itself and offers no way to put a
    middleware in front of it, so this wires the same pieces with Ray's app (its
    OpenAI error handlers included) gated first. Two of those pieces are private to Ray
    (``init`` and ``to_model_metadata``): the vLLM environment pins its Ray version.
    """
    from ray import serve
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.llm._internal.serve.core.ingress.ingress import init as ray_llm_fastapi_app
    from ray.serve.llm import LLMConfig, build_llm_deployment
    from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress

    deployment: dict[str, Any] = {"max_ongoing_requests": config.max_ongoing_requests or 2 * config.max_batch_size}
    deployment.update({"autoscaling_config": config.autoscaling} if config.autoscaling else {"num_replicas": config.num_replicas})
    # The replica only relays to its engine, whose placement holds the CPUs (and GPUs).
    deployment["ray_actor_options"] = {"num_cpus": 0}
    llm_config = LLMConfig(
        model_loading_config={"model_id": config.served_name, "model_source": config.model},
        deployment_config=deployment,
        log_engine_metrics=False,
        **_engine_settings(num_gpus, config.num_cpus_per_replica, config.max_batch_size, config.kv_cache_gib),
    )
    app = ray_llm_fastapi_app()
    app.add_middleware(BodyCheck)
    app.add_middleware(openai_api.Gate, max_bytes=config.max_request_bytes, key=api_key)  # added last: runs first
    ingress = make_fastapi_ingress(OpenAiIngress, app=app)
    return serve.deployment(ingress, **OpenAiIngress.get_deployment_options([llm_config])).bind(
        llm_deployments={llm_config.model_id: build_llm_deployment(llm_config)},
        model_cards={llm_config.model_id: to_model_metadata(llm_config.model_id, llm_config)},
    )


class BodyCheck:
    """ASGI middleware behind the gate: a generation request whose body is not a JSON
    object in valid Unicode (sent as JSON), or whose ``messages``, ``prompt`` or token
    limit has the wrong shape, gets a 4xx here: Ray Serve LLM's ingress answers those
    with a 500, or, for a streamed request with a negative ``max_tokens``, never. The
    rest of the body is vLLM's to validate (it takes more OpenAI fields than the hf app)."""

    ROUTES = {"/v1/chat/completions": "messages", "/v1/completions": "prompt"}

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        field = self.ROUTES.get(scope.get("path", "")) if scope["type"] == "http" and scope.get("method") == "POST" else None
        if field is None:
            return await self.app(scope, receive, send)
        message = await receive()  # the gate hands on the whole body in one message
        problem = _body_problem(dict(scope["headers"]).get(b"content-type", b""), message.get("body", b""), field)
        if problem:
            return await openai_api.error_response(*problem)(scope, receive, send)
        await self.app(scope, openai_api.replaying(message, receive), send)


def _body_problem(content_type: bytes, body: bytes, field: str) -> tuple[int, str] | None:
    import json

    if content_type.split(b";")[0].strip().lower() != b"application/json":
        return 422, "body: must be a JSON object sent with Content-Type: application/json"
    try:
        value = json.loads(body)
        json.dumps(value, ensure_ascii=False).encode("utf-8")  # a lone surrogate escape fails here
    except RecursionError:
        return 422, "body: JSON nested too deeply"
    except (ValueError, UnicodeError) as e:
        return 422, f"body: not valid JSON text in UTF-8: {str(e)[:200]}"
    if not isinstance(value, dict):
        return 422, "body: must be a JSON object"
    for name in ("max_tokens", "max_completion_tokens"):  # a streamed request with a negative one never gets an answer
        if value.get(name) is not None and (not isinstance(value[name], int) or isinstance(value[name], bool) or value[name] < 1):
            return 422, f"{name}: must be a whole number of at least 1"
    if field == "messages":
        messages = value.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            return 422, "messages: must be a non-empty list of message objects"
        for i, m in enumerate(messages):
            content = m.get("content")
            if not (content is None or isinstance(content, str) or (isinstance(content, list) and all(isinstance(part, dict) for part in content))):
                return 422, f"messages.{i}.content: must be text or a list of content parts"
    elif not (isinstance(value.get("prompt"), str) or (isinstance(value.get("prompt"), list) and all(isinstance(p, (str, int)) and not isinstance(p, bool) for p in value["prompt"]))):
        return 422, "prompt: must be text, a list of texts or a list of token ids"
    return None


# --- batch generation -----------------------------------------------------------------


def generate(requests, config: "BatchConfig", num_gpus: float, num_cpus: float):
    """The batch job's rows through a ``ray.data.llm`` processor: the same output columns
    as the hf engine, one row per input row, in order."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    processor_config = vLLMEngineProcessorConfig(
        model_source=config.model,
        batch_size=config.batch_size,
        concurrency=config.num_actors,
        # The job tokenizes (to cut long prompts as the hf engine does) and cuts the
        # response by token id; vLLM detokenizes.
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        **_engine_settings(num_gpus, num_cpus, config.batch_size, None),
    )
    processor = build_processor(
        processor_config,
        preprocess=functools.partial(_vllm_request, config=config),
        postprocess=functools.partial(_result, config=config),
    )
    return processor(requests)


@functools.lru_cache(maxsize=2)
def _tokenizer_and_budget(model: str, trust_remote_code: bool, max_new_tokens: int):
    """Loaded once per Ray worker process, which runs many rows."""
    from transformers import AutoConfig

    from dolly_ray.generation import context_positions, prompt_budget

    tokenizer = prompts.load_tokenizer(model, trust_remote_code=trust_remote_code)
    positions = context_positions(AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code))
    return tokenizer, prompts.add_special_tokens(tokenizer), prompt_budget(positions, max_new_tokens)


def _vllm_request(row: dict, config: "BatchConfig") -> dict:
    """One row as vLLM takes it: prompt token ids (cut from the left to fit, as the hf
    engine cuts them) and sampling parameters. A row with an error gets a one-token
    stand-in request, so that it still comes out, with its error, in its place."""
    tokenizer, ids, budget = _tokenizer_and_budget(config.model, config.trust_remote_code, config.max_new_tokens)
    params = config.params()
    sampling = {"max_tokens": params.max_new_tokens, "stop_token_ids": [ids.end], "seed": params.seed}
    if params.greedy:
        sampling["temperature"] = 0.0
    else:
        sampling.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or -1)
    if row["__error"] is not None:
        return {**row, "tokenized_prompt": [ids.response], "truncated": False, "sampling_params": {**sampling, "max_tokens": 1}}
    tokens = tokenizer(prompts.format_prompt(row["__instruction"], row["__input"]))["input_ids"]
    truncated = budget is not None and len(tokens) > budget
    return {**row, "tokenized_prompt": tokens[-budget:] if truncated else tokens, "truncated": truncated, "sampling_params": sampling}


def _result(row: dict, config: "BatchConfig") -> dict:
    """The hf engine's output columns, cut from vLLM's token ids by the hf engine's rule."""
    from dolly_ray.batch_generate import RESULT_SCHEMA
    from dolly_ray.generation import cut_response

    out = dict.fromkeys(RESULT_SCHEMA.names)
    out.update(__record=row["__record"], error=row["__error"])
    if row["__error"] is not None:
        return out
    tokenizer, ids, _ = _tokenizer_and_budget(config.model, config.trust_remote_code, config.max_new_tokens)
    result = cut_response(tokenizer, ids.end, row["generated_tokens"], row["num_input_tokens"], bool(row["truncated"]))
    out.update(response=result.response, finish_reason=result.finish_reason, num_prompt_tokens=result.num_prompt_tokens,
               num_generated_tokens=result.num_generated_tokens, truncated=result.truncated)
    return out
