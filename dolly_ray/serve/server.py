"""Ray Serve application: a checkpoint answers instructions over HTTP.

One ``InstructionServer`` replica holds one model in a ``ContinuousBatcher`` (requests
join the running batch as they arrive; prompts, stops and the response cut are
``InstructionGenerator``'s, as in the batch job) behind the OpenAI-compatible routes of
``openai_api``:

- ``POST /generate``: ``{instruction, input?, max_new_tokens?, temperature?, top_p?, seed?}``
  -> ``{response, finish_reason, usage}``;
- ``POST /v1/completions`` (the prompt is the instruction) and ``POST /v1/chat/completions``
  (messages read as the exported chat template reads them), with ``stream: true`` as
  server-sent events; ``GET /v1/models``; ``GET /v1/stats`` (this replica's counters);
  ``GET /healthz``.

Every request is checked before it reaches the model; a bad one gets a 4xx with an
OpenAI-style ``{"error": {...}}`` body, never a 500.
"""

import dataclasses
import ipaddress
import logging
import os
import signal
import socket
import threading
import time
from typing import Any

from ray import serve

from dolly_ray import cluster
from dolly_ray.cli import ConfigError, check_at_least
from dolly_ray.generate import vllm_engine
from dolly_ray.generate.generator import GenerationParams, GenerationResult, Request
from dolly_ray.models import check_loadable_model
from dolly_ray.serve import openai_api, vllm_app
from dolly_ray.serve.config import API_KEY_ENV, ServeConfig
from dolly_ray.serve.openai_api import ChatRequest, CompletionRequest, GenerateRequest

logger = logging.getLogger(__name__)

APP_NAME = "dolly_ray"


# --- the deployment -----------------------------------------------------------------


@serve.deployment
@serve.ingress()
class InstructionServer:
    """One replica: a loaded model in a continuous-batching loop, and the HTTP routes in front of it."""

    def __init__(self, config: ServeConfig, api_key: str):
        """``api_key`` comes resolved from the driver, whose environment holds it."""
        from dolly_ray.generate.generator import InstructionGenerator

        self.config, self.model_name, self.api_key = config, config.served_name, api_key
        generator = InstructionGenerator.from_pretrained(config.model, trust_remote_code=config.trust_remote_code, allow_pickle=config.allow_pickle)
        self.engine = self.start_engine(generator)
        self.requests = self.streams = 0
        self.created = int(time.time())

    def start_engine(self, generator):
        """What answers requests: continuous batching, or static batching for a model that
        cannot run in it. Anything with ``ContinuousBatcher``'s methods will do (a benchmark
        swaps in another)."""
        from dolly_ray.generate import continuous_batching
        from dolly_ray.generate.static_batching import StaticBatcher

        try:
            return continuous_batching.ContinuousBatcher(generator, max_requests_per_batch=self.config.max_batch_size, kv_cache_gib=self.config.kv_cache_gib)
        except continuous_batching.Unsupported as e:
            logger.warning("%s; serving with static batching (a stream gets its text when its batch ends)", e)
            return StaticBatcher(generator, self.config.max_batch_size)

    def check_health(self) -> None:
        """Ray Serve restarts a replica whose generation loop has died."""
        if not self.engine.is_running():
            raise RuntimeError("the continuous-batching generation loop has stopped")

    def __del__(self):
        """Serve calls this on a graceful shutdown: end the generation loop's thread."""
        if hasattr(self, "engine"):
            self.engine.stop()

    # -- request checks --

    def params(self, max_new_tokens: int | None, temperature: float | None, top_p: float | None, seed: int | None) -> GenerationParams:
        """A request's decoding parameters; temperature 0 is greedy (top_p and seed then do not matter)."""
        from fastapi import HTTPException

        max_new_tokens = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        if max_new_tokens > self.config.max_new_tokens_limit:
            raise HTTPException(400, f"max new tokens {max_new_tokens} is above this server's limit of {self.config.max_new_tokens_limit}")
        defaults = GenerationParams()
        if temperature == 0:
            return GenerationParams(max_new_tokens=max_new_tokens, greedy=True)
        return GenerationParams(
            max_new_tokens=max_new_tokens,
            temperature=defaults.temperature if temperature is None else temperature,
            top_p=defaults.top_p if top_p is None else top_p,
            seed=seed,
        )

    def check_prompt(self, request: Request, params: GenerationParams) -> None:
        """Refuse a prompt that does not fit the context beside the response (never cut it)."""
        from fastapi import HTTPException

        generator = self.engine.generator
        try:
            budget = generator.prompt_budget(params.max_new_tokens)
            params.validate()
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        if budget is None:
            return
        [ids] = generator.encode([request])
        if len(ids) > budget:
            raise HTTPException(
                400,
                f"the prompt is {len(ids)} tokens; with max new tokens {params.max_new_tokens} the model's "
                f"{generator.max_positions} positions leave room for {budget}",
            )

    def require_served_name(self, name: str | None) -> None:
        """A request that names a model must name this one (404 otherwise)."""
        from fastapi import HTTPException

        if name is not None and name != self.model_name:
            raise HTTPException(404, f"model {name!r} not found; this server serves {self.model_name!r}")

    # -- model calls --

    async def answer(self, request: Request, params: GenerationParams) -> GenerationResult:
        self.check_prompt(request, params)
        self.requests += 1
        return await self.engine.answer(request, params)

    def stream(self, request: Request, params: GenerationParams, reply: openai_api.Reply, options: openai_api.StreamOptions | None):
        from fastapi.responses import StreamingResponse

        self.check_prompt(request, params)
        self.requests += 1
        self.streams += 1
        return StreamingResponse(reply.events(self.engine.generate(request, params, stream=True), options), media_type="text/event-stream")

    def stats(self) -> dict[str, Any]:
        """This replica's counters: how many requests shared the running batch."""
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "batching": self.engine.batching,
            "max_batch_size": self.config.max_batch_size,
            "requests": self.requests,
            "streams": self.streams,
            "running": self.engine.running,
            "cancelled": self.engine.cancelled,
            "peak_shared_batch": self.engine.peak_shared(),
        }

    # -- HTTP --

    def __serve_build_asgi_app__(self):
        """The FastAPI app, built per replica so its limits come from the config."""
        from fastapi import FastAPI

        # No schema or docs pages, and no redirect from a path with a trailing slash: each
        # route has one URL, and anything else is a 404.
        app = FastAPI(title="dolly_ray", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
        openai_api.add_error_handlers(app)
        app.add_middleware(openai_api.Gate, max_bytes=self.config.max_request_bytes, key=self.api_key)

        @app.get(openai_api.HEALTH_PATH)
        async def healthz():
            return {"status": "ok", "model": self.model_name}

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created, "owned_by": "dolly_ray"}]}

        @app.get("/v1/stats")
        async def stats():
            return self.stats()

        @app.post("/generate")
        async def generate(body: GenerateRequest):
            params = self.params(body.max_new_tokens, body.temperature, body.top_p, body.seed)
            result = await self.answer((body.instruction, body.input), params)
            return {"response": result.response, "finish_reason": result.finish_reason, "usage": openai_api.usage(result)}

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest):
            self.require_served_name(body.model)
            params = self.params(body.max_tokens, body.temperature, body.top_p, body.seed)
            reply = openai_api.Reply("cmpl", "text_completion", self.model_name, chat=False)
            if body.stream:
                return self.stream((body.prompt, None), params, reply, body.stream_options)
            return reply.whole(await self.answer((body.prompt, None), params))

        @app.post("/v1/chat/completions")
        async def chat_completions(body: ChatRequest):
            self.require_served_name(body.model)
            prompt, max_tokens = openai_api.chat_prompt(body)
            params = self.params(max_tokens, body.temperature, body.top_p, body.seed)
            reply = openai_api.Reply("chatcmpl", "chat.completion", self.model_name, chat=True)
            if body.stream:
                return self.stream(prompt, params, reply, body.stream_options)
            return reply.whole(await self.answer(prompt, params))

        return app


# --- building and running -----------------------------------------------------------


def check(config: ServeConfig) -> None:
    """Fail fast, before any replica starts, on what can be checked here."""
    if not config.model:
        raise ConfigError("--model is required: the checkpoint's hf/ directory")
    check_at_least(config, 1, "max_batch_size", "num_replicas", "max_new_tokens", "max_new_tokens_limit", "max_request_bytes")
    check_at_least(config, 0, "num_cpus_per_replica", "num_gpus_per_replica")
    if vllm_engine.choose(config.engine, 0) == "vllm":  # a known engine, and vLLM installed if asked for
        vllm_engine.check_model(config.model)
    if config.kv_cache_gib is not None and config.kv_cache_gib <= 0:
        raise ConfigError(f"--kv-cache-gib must be above 0, got {config.kv_cache_gib}")
    if config.max_new_tokens > config.max_new_tokens_limit:
        raise ConfigError(f"--max-new-tokens {config.max_new_tokens} is above --max-new-tokens-limit {config.max_new_tokens_limit}")
    if config.max_ongoing_requests is not None and config.max_ongoing_requests < config.max_batch_size:
        raise ConfigError(f"--max-ongoing-requests {config.max_ongoing_requests} must be at least --max-batch-size {config.max_batch_size}")
    try:
        check_loadable_model(config.model, trust_remote_code=config.trust_remote_code, allow_pickle=config.allow_pickle, max_new_tokens=config.max_new_tokens)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def build_app(config: ServeConfig):
    """The Serve application for ``serve.run``; the API key falls back to $DOLLY_RAY_API_KEY.

    With ``num_gpus_per_replica`` unset, replicas get a GPU when the Ray this process
    joined has GPUs.
    """
    check(config)
    return _application(config)


def _application(config: ServeConfig):
    import ray

    num_gpus = cluster.gpus_per_actor(config.num_gpus_per_replica)
    if ray.is_initialized():  # `serve run` builds the app after joining; tests may build it alone
        replicas = config.autoscaling.get("min_replicas", 1) if config.autoscaling else config.num_replicas
        cluster.check_fits(
            cluster.Request(
                unit="replica",
                count=replicas,
                count_flag="--num-replicas",
                each={"CPU": config.num_cpus_per_replica, "GPU": num_gpus},
                fixes={"CPU": "pass --num-cpus-per-replica {fits} or fewer replicas (--num-replicas)", "GPU": "pass --num-gpus-per-replica {fits} or fewer replicas (--num-replicas)"},
            )
        )
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": config.num_cpus_per_replica, "num_gpus": num_gpus},
        "max_ongoing_requests": config.max_ongoing_requests or 2 * config.max_batch_size,
    }
    if config.autoscaling:
        options["autoscaling_config"] = config.autoscaling
    else:
        options["num_replicas"] = config.num_replicas
    api_key = config.api_key or os.environ.get(API_KEY_ENV, "")
    if vllm_engine.choose(config.engine, num_gpus) == "vllm":
        vllm_engine.check_model(config.model)
        return vllm_app.serve_app(config, api_key, num_gpus)
    return InstructionServer.options(**options).bind(config, api_key)


def app_builder(args: dict[str, Any]):
    """For ``serve run`` / ``serve deploy``: the application's ``args`` are ServeConfig fields.

    Values given on the ``serve run`` command line arrive as text and are converted.
    """
    from pydantic import TypeAdapter
    from pydantic import ValidationError as PydanticValidationError

    values = {key.replace("-", "_"): value for key, value in args.items()}
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(ServeConfig)})
    if unknown:
        raise ConfigError(f"unknown serve option(s) {unknown}")
    try:
        config = TypeAdapter(ServeConfig).validate_python(values)
    except PydanticValidationError as e:
        raise ConfigError(openai_api.validation_message(e.errors())) from None
    return build_app(config)


def run(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve in the foreground until Ctrl-C, then remove the application."""
    check(config)  # before Ray starts
    cluster.init_ray()
    app = _application(config)
    # A proxy on another node listening on that node's loopback would serve no one (and on
    # one machine would take the head's port): on loopback only the head node proxies.
    loopback = ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    serve.start(proxy_location="HeadOnly" if loopback else "EveryNode", http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/")
    url = f"http://{host}:{port}"
    logger.info("serving %s at %s (OpenAI base URL %s/v1); Ctrl-C stops", config.served_name, url, url)
    # Handlers of our own: the vllm engine's libraries leave Ctrl-C without a KeyboardInterrupt
    # in this process; SIGTERM is what `ray job stop` and container runtimes send.
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    logger.info("stopping: removing the application")
    serve.delete(APP_NAME)
