"""Ray Serve: real HTTP to 127.0.0.1 against a tiny checkpoint, plus the streaming hook it uses."""

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import yaml

from dolly_ray import serve as dolly_serve
from dolly_ray.generation import GenerationParams, InstructionGenerator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_NEW_TOKENS = 12
LIMIT = 64  # max_new_tokens_limit of the test servers
BODY_LIMIT = 64 * 1024
KEY = "test-key-123"
GREEDY = GenerationParams(greedy=True, max_new_tokens=MAX_NEW_TOKENS)


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    return InstructionGenerator.from_pretrained(tiny_model_dir)


# --- the streaming hook (no Ray) ----------------------------------------------------


def test_stream_pieces_join_to_the_generated_response(generator):
    requests_ = ["Reverse the word.", ("Sort the numbers.", "3 1 2"), "x" * 40]
    params = GenerationParams(greedy=True, max_new_tokens=24)
    expected = generator.generate(requests_, params, batch_size=1)
    for request, result in zip(requests_, expected):
        *pieces, final = list(generator.stream(request, params))
        assert all(isinstance(p, str) and p for p in pieces)
        assert final == result
        assert "".join(pieces) == result.response


def test_closing_a_stream_stops_generation(generator, monkeypatch):
    steps = []
    forward = generator.model.forward
    monkeypatch.setattr(generator.model, "forward", lambda *a, **k: steps.append(1) or forward(*a, **k))
    pieces = generator.stream("Write a long story.", GenerationParams(greedy=True, max_new_tokens=1500))
    next(pieces)
    pieces.close()  # joins the generation thread
    assert not [t for t in threading.enumerate() if t.name == "InstructionGenerator.stream"]
    assert len(steps) < 100  # stopped within a step of the close, far from 1500


# --- building the application ---------------------------------------------------------


def test_serve_config_yaml_deploys_the_app_builder(tiny_model_dir):
    from ray.serve.schema import ServeDeploySchema

    with open(os.path.join(ROOT, "serve_config.yaml")) as f:
        config = yaml.safe_load(f)
    [app] = ServeDeploySchema.model_validate(config).applications
    assert app.import_path == "dolly_ray.serve:app_builder"
    assert config["http_options"]["host"] == "127.0.0.1"
    args = {**app.args, "model": tiny_model_dir, "num_gpus_per_replica": 0}
    built = dolly_serve.app_builder(args)
    deployment = built._bound_deployment
    assert deployment.ray_actor_options["num_cpus"] == args["num_cpus_per_replica"]
    assert deployment.max_ongoing_requests == 2 * args["max_batch_size"]
    # `serve run dolly_ray.serve:app_builder max_batch_size=8 ...` passes text
    built = dolly_serve.app_builder({"model": tiny_model_dir, "max_batch_size": "8", "autoscaling": {"max_replicas": 3}})
    assert built._bound_deployment.init_args[0].max_batch_size == 8
    assert built._bound_deployment._deployment_config.autoscaling_config.max_replicas == 3


@pytest.mark.parametrize(
    "args, message",
    [
        ({"model": "MODEL", "max_batch_siz": 4}, "unknown serve option(s) ['max_batch_siz']"),
        ({"model": "MODEL", "max_batch_size": "many"}, "max_batch_size"),
        ({"model": "MODEL", "max_batch_size": 0}, "--max-batch-size must be at least 1"),
        ({"model": "MODEL", "max_new_tokens": 2047, "max_new_tokens_limit": 4000}, "leaves no room for a prompt"),
        ({"model": "MODEL", "max_new_tokens": 300, "max_new_tokens_limit": 200}, "above --max-new-tokens-limit"),
        ({"model": "MODEL", "max_batch_size": 32, "max_ongoing_requests": 8}, "--max-ongoing-requests 8 must be at least"),
        ({"model": "/no/such/checkpoint/hf"}, "model directory not found: /no/such/checkpoint/hf"),
        ({}, "--model is required"),
    ],
)
def test_bad_options_are_refused_before_any_replica_starts(tiny_model_dir, args, message):
    args = {k: tiny_model_dir if v == "MODEL" else v for k, v in args.items()}
    with pytest.raises(dolly_serve.ServeError) as e:
        dolly_serve.app_builder(args)
    assert message in str(e.value)


def test_pickle_only_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(dolly_serve.ServeError, match="no safetensors weights"):
        dolly_serve.app_builder({"model": str(tmp_path)})


def test_default_model_name():
    assert dolly_serve.default_model_name("/runs/gptj/checkpoint_000010/hf/") == "checkpoint_000010"
    assert dolly_serve.default_model_name("models/my-dolly") == "my-dolly"


def test_job_help_and_one_line_errors():
    script = os.path.join(ROOT, "jobs", "serve.py")
    done = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for flag in ("--model", "--host", "--port", "--max-batch-size", "--batch-wait-timeout-s", "--num-replicas", "--autoscaling", "--api-key"):
        assert flag in done.stdout
    done = subprocess.run([sys.executable, script, "--model", "/no/such/dir"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "error: model directory not found: /no/such/dir"


# --- over HTTP ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(serve_http, tiny_model_dir):
    """Two applications on one Serve: the open one at / and one with an API key at /keyed."""
    from ray import serve

    common = dict(
        model=tiny_model_dir,
        num_cpus_per_replica=0.5,
        max_new_tokens=MAX_NEW_TOKENS,
        max_new_tokens_limit=LIMIT,
        max_request_bytes=BODY_LIMIT,
    )
    open_app = dolly_serve.build_app(dolly_serve.ServeConfig(**common, max_batch_size=16, batch_wait_timeout_s=0.05))
    keyed_app = dolly_serve.build_app(dolly_serve.ServeConfig(**common, model_name="keyed", api_key=KEY))
    serve.run_many(
        [serve.RunTarget(open_app, name="dolly_open", route_prefix="/"), serve.RunTarget(keyed_app, name="dolly_keyed", route_prefix="/keyed")]
    )
    return serve_http


def _post(url, body, **kwargs):
    return requests.post(url, json=body, timeout=120, **kwargs)


@pytest.mark.slow
def test_generate_returns_the_generators_greedy_answer(server, generator):
    for instruction, input in [("Reverse the letters of the word.", "ray"), ("Name a primary color.", None)]:
        reply = _post(f"{server}/generate", {"instruction": instruction, "input": input, "temperature": 0})
        assert reply.status_code == 200, reply.text
        [expected] = generator.generate([(instruction, input)], GREEDY)
        body = reply.json()
        assert body["response"] == expected.response
        assert body["finish_reason"] == expected.finish_reason
        assert body["usage"] == {
            "prompt_tokens": expected.num_prompt_tokens,
            "completion_tokens": expected.num_generated_tokens,
            "total_tokens": expected.num_prompt_tokens + expected.num_generated_tokens,
        }
    assert requests.get(f"{server}/healthz", timeout=30).json()["status"] == "ok"


@pytest.mark.slow
def test_openai_client_completions_chat_and_streams(server, generator, tiny_model_dir):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    name = dolly_serve.default_model_name(tiny_model_dir)
    assert [m.id for m in client.models.list()] == [name]
    instruction = "Give three tips for staying healthy."
    [expected] = generator.generate([instruction], GREEDY)

    completion = client.completions.create(model=name, prompt=instruction, temperature=0)
    assert completion.choices[0].text == expected.response
    assert completion.choices[0].finish_reason == expected.finish_reason
    assert completion.usage.completion_tokens == expected.num_generated_tokens

    chat = client.chat.completions.create(
        model=name,
        temperature=0,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say no."}, {"role": "assistant", "content": "No."}, {"role": "user", "content": instruction}],
    )
    assert chat.choices[0].message.content == expected.response
    assert chat.choices[0].message.role == "assistant"

    chunks = list(client.completions.create(model=name, prompt=instruction, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == completion.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    assert chunks[-1].usage.total_tokens == completion.usage.total_tokens
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # it really came in pieces

    chat_chunks = list(client.chat.completions.create(model=name, messages=[{"role": "user", "content": instruction}], temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chat_chunks) == expected.response


@pytest.mark.slow
def test_concurrent_requests_share_batches(server, generator):
    before = requests.get(f"{server}/v1/stats", timeout=30).json()
    instructions = [f"Request {i}: repeat the word {'abcdefgh'[i % 8] * (1 + i % 5)}." for i in range(64)]

    def ask(instruction):
        return _post(f"{server}/generate", {"instruction": instruction, "temperature": 0})

    with ThreadPoolExecutor(64) as pool:
        replies = list(pool.map(ask, instructions))
    assert [r.status_code for r in replies] == [200] * 64
    expected = generator.generate(instructions, GREEDY, batch_size=1)
    assert [r.json()["response"] for r in replies] == [e.response for e in expected]  # each answer went to its own request

    after = requests.get(f"{server}/v1/stats", timeout=30).json()
    assert after["batched_requests"] - before["batched_requests"] == 64
    new_batches = {int(size): count - before["batch_sizes"].get(size, 0) for size, count in after["batch_sizes"].items()}
    assert max(size for size, count in new_batches.items() if count > 0) > 1
    assert after["batches"] - before["batches"] < 64


@pytest.mark.slow
def test_requests_with_different_parameters_in_one_batch(server, generator):
    asks = [
        {"instruction": "Name a color.", "temperature": 0, "max_new_tokens": 4},
        {"instruction": "Name a color.", "temperature": 0, "max_new_tokens": 9},
        {"instruction": "Name a fruit.", "temperature": 0.8, "top_p": 0.9, "seed": 7, "max_new_tokens": 6},
        {"instruction": "Name a fruit.", "temperature": 0},
    ] * 4
    with ThreadPoolExecutor(len(asks)) as pool:
        replies = list(pool.map(lambda body: _post(f"{server}/generate", body), asks))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]
    for body, reply in zip(asks, replies):
        max_new_tokens = body.get("max_new_tokens", MAX_NEW_TOKENS)
        assert reply.json()["usage"]["completion_tokens"] <= max_new_tokens
        if body["temperature"] == 0:
            [expected] = generator.generate([body["instruction"]], GenerationParams(greedy=True, max_new_tokens=max_new_tokens))
            assert reply.json()["response"] == expected.response


LONG_PROMPT = "tell me more about this " * 800  # well past the tiny model's 2048 positions
USER = {"role": "user", "content": "hi"}

BAD_REQUESTS = {
    "no instruction": ("/generate", {"input": "x"}, 422),
    "empty instruction": ("/generate", {"instruction": ""}, 422),
    "blank instruction": ("/generate", {"instruction": " \n\t"}, 422),
    "instruction is a number": ("/generate", {"instruction": 42}, 422),
    "instruction is null": ("/generate", {"instruction": None}, 422),
    "instruction holds a prompt key": ("/generate", {"instruction": "a ### Response: b"}, 422),
    "input is a list": ("/generate", {"instruction": "x", "input": ["a"]}, 422),
    "input holds the end key": ("/generate", {"instruction": "x", "input": "### End"}, 422),
    "max_new_tokens as text": ("/generate", {"instruction": "x", "max_new_tokens": "5"}, 422),
    "max_new_tokens is a bool": ("/generate", {"instruction": "x", "max_new_tokens": True}, 422),
    "max_new_tokens zero": ("/generate", {"instruction": "x", "max_new_tokens": 0}, 422),
    "max_new_tokens over the cap": ("/generate", {"instruction": "x", "max_new_tokens": LIMIT + 1}, 400),
    "max_new_tokens enormous": ("/generate", {"instruction": "x", "max_new_tokens": 10**30}, 400),
    "negative temperature": ("/generate", {"instruction": "x", "temperature": -0.5}, 422),
    "temperature as text": ("/generate", {"instruction": "x", "temperature": "hot"}, 422),
    "temperature so small that sampling overflows": ("/generate", {"instruction": "x", "temperature": 1e-300}, 422),
    "temperature above 2": ("/generate", {"instruction": "x", "temperature": 2.5}, 422),
    "top_p zero": ("/generate", {"instruction": "x", "top_p": 0}, 422),
    "top_p above one": ("/generate", {"instruction": "x", "top_p": 1.5}, 422),
    "negative seed": ("/generate", {"instruction": "x", "seed": -1}, 422),
    "unknown field": ("/generate", {"instruction": "x", "max_tokens": 5}, 422),
    "prompt longer than the context": ("/generate", {"instruction": LONG_PROMPT}, 400),
    "body is a list": ("/generate", [{"instruction": "x"}], 422),
    "completion for an unknown model": ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404),
    "completion without prompt": ("/v1/completions", {"model": None}, 422),
    "completion prompt as a list": ("/v1/completions", {"prompt": ["x", "y"]}, 422),
    "completion with n=2": ("/v1/completions", {"prompt": "x", "n": 2}, 422),
    "completion with stop sequences": ("/v1/completions", {"prompt": "x", "stop": ["\n"]}, 422),
    "completion max_tokens over the cap": ("/v1/completions", {"prompt": "x", "max_tokens": LIMIT + 1}, 400),
    "streamed completion too long for the context": ("/v1/completions", {"prompt": LONG_PROMPT, "stream": True}, 400),
    "stream flag as text": ("/v1/completions", {"prompt": "x", "stream": "yes"}, 422),
    "chat with an unknown model": ("/v1/chat/completions", {"model": "nope", "messages": [USER]}, 404),
    "chat without messages": ("/v1/chat/completions", {"messages": []}, 422),
    "chat with no user message": ("/v1/chat/completions", {"messages": [{"role": "system", "content": "be nice"}]}, 400),
    "chat with an unknown role": ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 422),
    "chat content not text": ("/v1/chat/completions", {"messages": [{"role": "user", "content": {"text": "hi"}}]}, 422),
    "chat last user message blank": ("/v1/chat/completions", {"messages": [USER, {"role": "user", "content": "  "}]}, 400),
    "chat with both token limits": ("/v1/chat/completions", {"messages": [USER], "max_tokens": 3, "max_completion_tokens": 3}, 400),
}

RAW_BAD_REQUESTS = {
    "malformed JSON": ("POST", "/generate", b'{"instruction": ', {"content-type": "application/json"}, 422),
    "NaN temperature": ("POST", "/generate", b'{"instruction": "x", "temperature": NaN}', {"content-type": "application/json"}, 422),
    "unpaired surrogate": ("POST", "/generate", b'{"instruction": "x \\ud800"}', {"content-type": "application/json"}, 422),
    "invalid UTF-8": ("POST", "/generate", b'{"instruction": "\xff\xfe"}', {"content-type": "application/json"}, 400),
    "empty body": ("POST", "/generate", b"", {"content-type": "application/json"}, 422),
    "form instead of JSON": ("POST", "/generate", b"instruction=x", {"content-type": "application/x-www-form-urlencoded"}, 422),
    "body over the size cap": ("POST", "/generate", b'{"instruction": "' + b"a" * BODY_LIMIT + b'"}', {"content-type": "application/json"}, 413),
    "chunked body over the size cap": ("POST", "/generate", "chunked", {"content-type": "application/json"}, 413),
    "GET on a POST route": ("GET", "/generate", None, {}, 405),
    "unknown path": ("POST", "/v2/complete", b"{}", {"content-type": "application/json"}, 404),
}


def _chunks():
    yield b'{"instruction": "'
    for _ in range(8):
        yield b"b" * (BODY_LIMIT // 4)
    yield b'"}'


@pytest.mark.slow
@pytest.mark.parametrize("path, body, status", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_request_gets_a_4xx_with_a_json_error(server, path, body, status):
    reply = _post(server + path, body)
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["message"]


@pytest.mark.slow
@pytest.mark.parametrize("method, path, data, headers, status", RAW_BAD_REQUESTS.values(), ids=RAW_BAD_REQUESTS.keys())
def test_malformed_request_gets_a_4xx_with_a_json_error(server, method, path, data, headers, status):
    data = _chunks() if data == "chunked" else data
    reply = requests.request(method, server + path, data=data, headers=headers, timeout=120)
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["message"]
    if status == 405:
        assert reply.headers["allow"] == "POST"


@pytest.mark.slow
def test_still_answers_after_bad_requests(server, generator):
    # runs after the bad-request tests (pytest keeps file order)
    reply = _post(f"{server}/generate", {"instruction": "Name a primary color.", "temperature": 0})
    assert reply.status_code == 200
    assert reply.json()["response"] == generator.generate(["Name a primary color."], GREEDY)[0].response


@pytest.mark.slow
def test_api_key(server, generator):
    import openai

    url = f"{server}/keyed"
    body = {"instruction": "Name a primary color.", "temperature": 0}
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}]:
        reply = _post(f"{url}/generate", body, headers=headers)
        assert reply.status_code == 401, headers
        assert reply.json()["error"]["type"] == "authentication_error"
    assert requests.get(f"{url}/v1/models", timeout=30).status_code == 401
    assert requests.post(f"{url}/generate", data=b"{not json", timeout=30).status_code == 401  # before the body is read
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200  # open to load balancers

    reply = _post(f"{url}/generate", body, headers={"Authorization": f"Bearer {KEY}"})
    assert reply.status_code == 200
    assert reply.json()["response"] == generator.generate(["Name a primary color."], GREEDY)[0].response
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong").completions.create(model="keyed", prompt="hi")
    chat = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY).chat.completions.create(model="keyed", messages=[USER], temperature=0)
    assert chat.choices[0].message.content == generator.generate(["hi"], GREEDY)[0].response
