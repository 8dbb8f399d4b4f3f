"""The vllm engine's Serve app: a ``ray.serve.llm`` OpenAI app on the exported checkpoint
(its chat template writes the Dolly prompt, its generation config stops at ``### End``),
behind the same API-key and body-size gate as the hf server, plus a body check."""

from __future__ import annotations

from typing import Any

from dolly_ray.generate import vllm_engine
from dolly_ray.serve import openai_api
from dolly_ray.serve.config import ServeConfig


def serve_app(config: ServeConfig, api_key: str, num_gpus: float):
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
        **vllm_engine.engine_settings(num_gpus, config.num_cpus_per_replica, config.max_batch_size, config.kv_cache_gib),
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
