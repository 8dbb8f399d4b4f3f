"""Ray Serve application: a checkpoint answers instructions over HTTP.

One ``InstructionServer`` replica holds one ``InstructionGenerator`` (the same class the
batch job uses) behind a FastAPI app:

- ``POST /generate``: ``{instruction, input?, max_new_tokens?, temperature?, top_p?, seed?}``
  -> ``{response, finish_reason, usage}``;
- ``POST /v1/completions`` (the prompt is the instruction) and ``POST /v1/chat/completions``
  (the last user message is the instruction), OpenAI-compatible, with ``stream: true`` as
  server-sent events; ``GET /v1/models``; ``GET /v1/stats`` (this replica's batch sizes);
  ``GET /healthz``.

Non-streaming requests meet in ``@serve.batch``: requests with identical decoding
parameters share one ``generate`` call. A stream runs alone, token by token. Every
request is checked before it reaches the model; a bad one gets a 4xx with an
OpenAI-style ``{"error": {...}}`` body, never a 500.
"""

import asyncio
import collections
import dataclasses
import hmac
import ipaddress
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from ray import serve

from dolly_ray import cluster, prompts
from dolly_ray.cli import ConfigError, check_at_least, option
from dolly_ray.generation import GenerationParams, GenerationResult, Request, check_loadable_model

logger = logging.getLogger(__name__)

API_KEY_ENV = "DOLLY_RAY_API_KEY"
APP_NAME = "dolly_ray"
HEALTH_PATH = "/healthz"
MIN_TEMPERATURE = 0.01  # the smallest non-zero sampling temperature accepted


@dataclass
class ServeConfig:
    """One served model; jobs/serve.py flags and a Serve config file's ``args`` fill it."""

    model: str = option("", "the checkpoint's Hugging Face model directory (<checkpoint>/hf) or a hub id")
    model_name: str = option("", "name clients send as `model` and /v1/models lists; empty: the directory's name")
    num_replicas: int = option(1, "replicas, each holding one copy of the model")
    autoscaling: dict = option({}, "Ray Serve autoscaling_config, e.g. {\"min_replicas\": 1, \"max_replicas\": 4}; replaces num_replicas")
    num_cpus_per_replica: float = option(1.0, "CPUs reserved per replica (fractions allowed)")
    num_gpus_per_replica: float = option(None, "GPUs per replica; null: 1 when the cluster has GPUs, else 0")
    max_batch_size: int = option(16, "most requests one dynamic batch holds (1 turns batching off)")
    batch_wait_timeout_s: float = option(0.02, "longest a request waits for others to join its batch")
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


# --- requests -----------------------------------------------------------------------


def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (it holds an unpaired surrogate)") from None
    return text


def _instruction(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return _no_prompt_key(text)


def _temperature(value: float) -> float:
    # Below this, logits / temperature can overflow to inf and break sampling.
    if 0 < value < MIN_TEMPERATURE:
        raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}")
    return value


def _no_prompt_key(text: str) -> str:
    key = prompts.contains_prompt_key(text)
    if key:
        raise ValueError(f"must not contain the prompt key {key!r}")
    return text


Text = Annotated[str, AfterValidator(_unicode)]
InstructionText = Annotated[Text, AfterValidator(_instruction)]
InputText = Annotated[Text, AfterValidator(_no_prompt_key)]
MaxTokens = Annotated[int, Field(ge=1)]
Temperature = Annotated[float, Field(ge=0, le=2, allow_inf_nan=False, description="0: greedy"), AfterValidator(_temperature)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


class _Body(BaseModel):
    """Strict: a number sent as text or a misspelt field is an error, not a guess."""

    model_config = ConfigDict(strict=True, extra="forbid")


class GenerateRequest(_Body):
    instruction: InstructionText
    input: InputText | None = None
    max_new_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _OpenAIBody(_Body):
    """The OpenAI fields this server honours; others (stop, logprobs, ...) are refused by name."""

    model: str | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class CompletionRequest(_OpenAIBody):
    prompt: InstructionText
    max_tokens: MaxTokens | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text
    name: str | None = None


class ChatRequest(_OpenAIBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None


# --- errors -------------------------------------------------------------------------

_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error"}


def error_response(status: int, message: str, headers: dict[str, str] | None = None):
    """OpenAI's error shape, which its clients turn into typed exceptions."""
    from fastapi.responses import JSONResponse

    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(errors) -> str:
    """``field.path: what is wrong`` per error, without echoing the (maybe huge) input."""
    parts = []
    for error in errors[:10]:
        where = ".".join(str(part)[:80] for part in error.get("loc", ()) if part != "body") or "body"
        detail = error.get("msg", "invalid")
        if error.get("type") == "json_invalid":
            where, detail = "body", f"invalid JSON at character {where}: {error.get('ctx', {}).get('error', '')}"
        elif where == "body" and isinstance(error.get("input"), bytes):  # not read as JSON: its content type says otherwise
            detail = "must be a JSON object sent with Content-Type: application/json"
        parts.append(f"{where}: {detail}")
    return "; ".join(parts)


def _add_error_handlers(app) -> None:
    from fastapi.exceptions import RequestValidationError
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException

    async def http_error(request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail), exc.headers)  # e.g. Allow on a 405

    async def invalid(request, exc: RequestValidationError | ValidationError):
        return error_response(422, _validation_message(exc.errors()))

    async def unexpected(request, exc: Exception):
        logger.exception("request %s %s failed", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}")

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(ValidationError, invalid)
    app.add_exception_handler(Exception, unexpected)


class _Gate:
    """ASGI middleware, in front of everything: a missing or wrong API key gets 401 (on
    every path but the health check) before the body is read, and a body over the size
    limit gets 413, whether its length was declared or it arrives in chunks."""

    def __init__(self, app, max_bytes: int, key: str):
        self.app, self.max_bytes, self.key = app, max_bytes, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.exceptions import HTTPException

        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        if self.key and _route_path(scope) != HEALTH_PATH and (scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key)):
            response = error_response(401, "missing or wrong API key: send Authorization: Bearer <key>", {"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        too_large = f"the request body is over this server's limit of {self.max_bytes} bytes"
        length = headers.get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_bytes:
            return await error_response(413, too_large)(scope, receive, send)
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, too_large)  # FastAPI passes it to the error handlers
            return message

        await self.app(scope, counted_receive, send)


def _route_path(scope) -> str:
    """The path inside the application, without Serve's route prefix."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] or "/" if root and path.startswith(root) else path


# --- the deployment -----------------------------------------------------------------


def _usage(result: GenerationResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.num_prompt_tokens,
        "completion_tokens": result.num_generated_tokens,
        "total_tokens": result.num_prompt_tokens + result.num_generated_tokens,
    }


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


@serve.deployment
@serve.ingress()
class InstructionServer:
    """One replica: a loaded model, a batch queue and the HTTP routes in front of them."""

    def __init__(self, config: ServeConfig, api_key: str):
        """``api_key`` comes resolved from the driver, whose environment holds it."""
        from dolly_ray.generation import InstructionGenerator

        self.config, self.model_name, self.api_key = config, config.served_name, api_key
        self.generator = InstructionGenerator.from_pretrained(
            config.model, trust_remote_code=config.trust_remote_code, allow_pickle=config.allow_pickle
        )
        self.generate_in_dynamic_batch.set_max_batch_size(config.max_batch_size)
        self.generate_in_dynamic_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        # One model call at a time: batches and streams take turns, so memory stays bounded
        # and generate() never runs twice at once on one model.
        self.model_lock = asyncio.Lock()
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.streams = 0
        self.created = int(time.time())

    # -- model calls --

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)  # both replaced from the config in __init__
    async def generate_in_dynamic_batch(self, jobs: list[tuple[Request, GenerationParams]]) -> list[GenerationResult]:
        """One dynamic batch: one generate() call per group of identical parameters."""
        self.batch_sizes[len(jobs)] += 1
        groups: dict[tuple, list[int]] = collections.defaultdict(list)
        for i, (_, params) in enumerate(jobs):
            groups[dataclasses.astuple(params)].append(i)
        results: list[GenerationResult | None] = [None] * len(jobs)
        for indices in groups.values():
            requests, params = [jobs[i][0] for i in indices], jobs[indices[0]][1]
            async with self.model_lock:
                group = await asyncio.to_thread(self.generator.generate, requests, params, batch_size=len(requests))
            for i, result in zip(indices, group):
                results[i] = result
        return results  # type: ignore[return-value]

    async def stream(self, request: Request, params: GenerationParams) -> AsyncIterator[str | GenerationResult]:
        """The generator's text pieces as they are decoded, then its result.

        One thread runs the whole iteration (and closes it), so a client that goes away
        stops generation at the next token without touching a generator that is busy.
        """
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        gone = threading.Event()

        def produce() -> None:
            pieces = self.generator.stream(request, params)
            try:
                for piece in pieces:
                    loop.call_soon_threadsafe(items.put_nowait, piece)
                    if gone.is_set():
                        break
            except Exception as e:  # re-raised on the event loop below
                loop.call_soon_threadsafe(items.put_nowait, e)
            finally:
                pieces.close()
                loop.call_soon_threadsafe(items.put_nowait, None)

        async with self.model_lock:
            self.streams += 1
            done = loop.run_in_executor(None, produce)
            try:
                while (item := await items.get()) is not None:
                    if isinstance(item, Exception):
                        raise item
                    yield item
            finally:
                gone.set()
                await asyncio.shield(done)

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

    async def check_prompt(self, request: Request, params: GenerationParams) -> None:
        """Refuse a prompt that does not fit the context beside the response (never cut it)."""
        from fastapi import HTTPException

        try:
            budget = self.generator.prompt_budget(params.max_new_tokens)
            params.validate()
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        if budget is None:
            return
        [ids] = await asyncio.to_thread(self.generator.encode, [request])
        if len(ids) > budget:
            raise HTTPException(
                400,
                f"the prompt is {len(ids)} tokens; with max new tokens {params.max_new_tokens} the model's "
                f"{self.generator.max_positions} positions leave room for {budget}",
            )

    def require_served_name(self, name: str | None) -> None:
        """A request that names a model must name this one (404 otherwise)."""
        from fastapi import HTTPException

        if name is not None and name != self.model_name:
            raise HTTPException(404, f"model {name!r} not found; this server serves {self.model_name!r}")

    async def answer(self, request: Request, params: GenerationParams) -> GenerationResult:
        await self.check_prompt(request, params)
        return await self.generate_in_dynamic_batch((request, params))

    def stats(self) -> dict[str, Any]:
        """This replica's counters: how well dynamic batching is filling batches."""
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "max_batch_size": self.config.max_batch_size,
            "batches": sum(self.batch_sizes.values()),
            "batched_requests": sum(size * count for size, count in self.batch_sizes.items()),
            "batch_sizes": {str(size): count for size, count in sorted(self.batch_sizes.items())},
            "streams": self.streams,
        }

    # -- HTTP --

    def __serve_build_asgi_app__(self):
        """The FastAPI app, built per replica so its limits come from the config."""
        from fastapi import FastAPI
        from fastapi.responses import StreamingResponse

        # No schema or docs pages, and no redirect from a path with a trailing slash: each
        # route has one URL, and anything else is a 404.
        app = FastAPI(title="dolly_ray", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
        _add_error_handlers(app)
        app.add_middleware(_Gate, max_bytes=self.config.max_request_bytes, key=self.api_key)

        @app.get(HEALTH_PATH)
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
            return {"response": result.response, "finish_reason": result.finish_reason, "usage": _usage(result)}

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest):
            self.require_served_name(body.model)
            params = self.params(body.max_tokens, body.temperature, body.top_p, body.seed)
            reply = _Reply("cmpl", "text_completion", self.model_name, chat=False)
            if body.stream:
                await self.check_prompt((body.prompt, None), params)
                return StreamingResponse(reply.events(self.stream((body.prompt, None), params), body.stream_options), media_type="text/event-stream")
            return reply.whole(await self.answer((body.prompt, None), params))

        @app.post("/v1/chat/completions")
        async def chat_completions(body: ChatRequest):
            self.require_served_name(body.model)
            prompt, max_tokens = _chat_prompt(body)
            params = self.params(max_tokens, body.temperature, body.top_p, body.seed)
            reply = _Reply("chatcmpl", "chat.completion", self.model_name, chat=True)
            if body.stream:
                await self.check_prompt(prompt, params)
                return StreamingResponse(reply.events(self.stream(prompt, params), body.stream_options), media_type="text/event-stream")
            return reply.whole(await self.answer(prompt, params))

        return app


def _chat_prompt(body: ChatRequest) -> tuple[tuple[str, str | None], int | None]:
    """The ``(instruction, input)`` of a chat request and its token limit, read as the
    exported chat template reads messages: the last user message is the instruction, the
    last system (or developer) message the Input block."""
    from fastapi import HTTPException

    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise HTTPException(400, "send max_completion_tokens or max_tokens, not both")
    users = [m.content for m in body.messages if m.role == "user"]
    if not users:
        raise HTTPException(400, "messages hold no user message; its content is the instruction")
    systems = [m.content for m in body.messages if m.role in ("system", "developer")]
    try:
        instruction = _instruction(users[-1])
    except ValueError as e:
        raise HTTPException(400, f"the last user message {e}") from None
    try:
        input = _no_prompt_key(systems[-1]) if systems else None
    except ValueError as e:
        raise HTTPException(400, f"the system message {e}") from None
    return (instruction, input), body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens


class _Reply:
    """One OpenAI completion or chat completion, whole or as server-sent event chunks."""

    def __init__(self, prefix: str, kind: str, model: str, *, chat: bool):
        self.id, self.kind, self.model, self.chat = f"{prefix}-{uuid.uuid4().hex}", kind, model, chat
        self.created = int(time.time())

    def _envelope(self, kind: str, choices: list, usage: dict | None = None) -> dict:
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body

    def _choice(self, text: str | None, finish_reason: str | None, *, delta: bool) -> dict:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        if delta:
            return {"index": 0, "delta": {} if text is None else {"content": text}, "finish_reason": finish_reason}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}

    def whole(self, result: GenerationResult) -> dict:
        return self._envelope(self.kind, [self._choice(result.response, result.finish_reason, delta=False)], _usage(result))

    async def events(self, pieces: AsyncIterator[str | GenerationResult], options: StreamOptions | None) -> AsyncIterator[str]:
        """Chunks as OpenAI sends them: the text, a last chunk with the finish reason,
        usage if asked for, then ``data: [DONE]``."""
        kind = "chat.completion.chunk" if self.chat else self.kind
        if self.chat:
            yield _sse(self._envelope(kind, [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]))
        try:
            async for piece in pieces:
                if isinstance(piece, GenerationResult):
                    yield _sse(self._envelope(kind, [self._choice(None, piece.finish_reason, delta=True)]))
                    if options is not None and options.include_usage:
                        yield _sse(self._envelope(kind, [], _usage(piece)))
                else:
                    yield _sse(self._envelope(kind, [self._choice(piece, None, delta=True)]))
        except Exception as e:  # the status line has gone out: report in the stream
            logger.exception("stream %s failed", self.id)
            yield _sse({"error": {"message": f"generation failed: {type(e).__name__}", "type": "server_error", "param": None, "code": None}})
        yield "data: [DONE]\n\n"


# --- building and running -----------------------------------------------------------


def default_model_name(model: str) -> str:
    """The directory's name; for a training checkpoint's ``hf/`` folder, the checkpoint's."""
    path = Path(model.rstrip("/"))
    return path.parent.name if path.name == "hf" and path.parent.name else path.name


def check(config: ServeConfig) -> None:
    """Fail fast, before any replica starts, on what can be checked here."""
    if not config.model:
        raise ConfigError("--model is required: the checkpoint's hf/ directory")
    check_at_least(config, 1, "max_batch_size", "num_replicas", "max_new_tokens", "max_new_tokens_limit", "max_request_bytes")
    check_at_least(config, 0, "batch_wait_timeout_s", "num_cpus_per_replica", "num_gpus_per_replica")
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
        raise ConfigError(_validation_message(e.errors())) from None
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
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.delete(APP_NAME)
