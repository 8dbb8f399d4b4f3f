"""The OpenAI-compatible HTTP protocol of the hf engine's server, apart from any model.

Request bodies (strict pydantic models: a misspelt field or a number sent as text is a
422 naming the field), OpenAI's error shape, completion and chat replies whole or as
server-sent events, and the gate in front of every route (API key, body size).
"""

import hmac
import json
import logging
import time
import uuid
from typing import Annotated, Any, AsyncIterator, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from dolly_ray import prompts
from dolly_ray.generate.generator import GenerationResult

logger = logging.getLogger(__name__)

HEALTH_PATH = "/healthz"
MIN_TEMPERATURE = 0.01  # the smallest non-zero sampling temperature accepted


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


def validation_message(errors) -> str:
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


def add_error_handlers(app) -> None:
    from fastapi.exceptions import RequestValidationError
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException

    async def http_error(request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail), exc.headers)  # e.g. Allow on a 405

    async def invalid(request, exc: RequestValidationError | ValidationError):
        return error_response(422, validation_message(exc.errors()))

    async def unexpected(request, exc: Exception):
        logger.exception("request %s %s failed", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}")

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(ValidationError, invalid)
    app.add_exception_handler(Exception, unexpected)


class Gate:
    """ASGI middleware, in front of everything: a missing or wrong API key gets 401 (on
    every path but the health check) before the body is read, and a body over the size
    limit gets 413, whether its length was declared or it arrives in chunks. The body is
    read whole (it is small) and handed on, so any app behind the gate, ours or Ray
    Serve LLM's, sees only bodies within the limit."""

    def __init__(self, app, max_bytes: int, key: str):
        self.app, self.max_bytes, self.key = app, max_bytes, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        if self.key and _route_path(scope) != HEALTH_PATH and (scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key)):
            response = error_response(401, "missing or wrong API key: send Authorization: Bearer <key>", {"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        too_large = error_response(413, f"the request body is over this server's limit of {self.max_bytes} bytes")
        length = headers.get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_bytes:
            return await too_large(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await too_large(scope, receive, send)
        await self.app(scope, replaying({"type": "http.request", "body": body, "more_body": False}, receive), send)


def replaying(message: dict, receive):
    """An ASGI ``receive`` that hands on ``message``, a body already read whole, then what
    ``receive`` brings after it (a disconnect, for a stream)."""
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return message

    return replay


def _route_path(scope) -> str:
    """The path inside the application, without Serve's route prefix."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] or "/" if root and path.startswith(root) else path


# --- replies ------------------------------------------------------------------------


def usage(result: GenerationResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.num_prompt_tokens,
        "completion_tokens": result.num_generated_tokens,
        "total_tokens": result.num_prompt_tokens + result.num_generated_tokens,
    }


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def chat_prompt(body: ChatRequest) -> tuple[tuple[str, str | None], int | None]:
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


class Reply:
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
        return self._envelope(self.kind, [self._choice(result.response, result.finish_reason, delta=False)], usage(result))

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
                        yield _sse(self._envelope(kind, [], usage(piece)))
                else:
                    yield _sse(self._envelope(kind, [self._choice(piece, None, delta=True)]))
        except Exception as e:  # the status line has gone out: report in the stream
            logger.exception("stream %s failed", self.id)
            yield _sse({"error": {"message": f"generation failed: {type(e).__name__}", "type": "server_error", "param": None, "code": None}})
        yield "data: [DONE]\n\n"
