"""Ray Serve: real HTTP to 127.0.0.1 against a tiny checkpoint, plus the streaming hook it uses."""

import asyncio
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import yaml

from dolly_ray import testing
from dolly_ray.cli import ConfigError
from dolly_ray.generate.generator import GenerationParams
from dolly_ray.serve import server as dolly_serve
from dolly_ray.serve.config import ServeConfig, default_model_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_NEW_TOKENS = 12
LIMIT = 1500  # max_new_tokens_limit of the test servers: room for a long stream to cancel
BODY_LIMIT = 64 * 1024
KEY = "test-key-123"
GREEDY = GenerationParams(greedy=True, max_new_tokens=MAX_NEW_TOKENS)
USER = {"role": "user", "content": "hi"}


# --- building the application ---------------------------------------------------------


def test_serve_config_yaml_deploys_the_app_builder(tiny_model_dir):
    from ray.serve.schema import ServeDeploySchema

    with open(os.path.join(ROOT, "serve_config.yaml")) as f:
        config = yaml.safe_load(f)
    [app] = ServeDeploySchema.model_validate(config).applications
    assert app.import_path == "dolly_ray.serve.server:app_builder"
    assert config["http_options"]["host"] == "127.0.0.1"
    # On this test's Ray: a replica of the file's size would not fit its CPUs (and is refused).
    args = {**app.args, "model": tiny_model_dir, "num_gpus_per_replica": 0, "num_cpus_per_replica": 0.5}
    built = dolly_serve.app_builder(args)
    deployment = built._bound_deployment
    assert deployment.ray_actor_options["num_cpus"] == args["num_cpus_per_replica"]
    assert deployment.max_ongoing_requests == 2 * args["max_batch_size"]
    # `serve run dolly_ray.serve.server:app_builder max_batch_size=8 ...` passes text
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
    with pytest.raises(ConfigError) as e:
        dolly_serve.app_builder(args)
    assert message in str(e.value)


def test_default_model_name():
    assert default_model_name("/runs/gptj/checkpoint_000010/hf/") == "checkpoint_000010"
    assert default_model_name("models/my-dolly") == "my-dolly"


def test_job_help_and_one_line_errors():
    script = os.path.join(ROOT, "jobs", "serve.py")
    done = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for flag in ("--model", "--host", "--port", "--max-batch-size", "--kv-cache-gib", "--num-replicas", "--autoscaling", "--api-key"):
        assert flag in done.stdout
    done = subprocess.run([sys.executable, script, "--model", "/no/such/dir"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "error: model directory not found: /no/such/dir"


def test_replicas_the_cluster_cannot_hold_fail_fast(tiny_model_dir):
    script = os.path.join(ROOT, "jobs", "serve.py")
    start = time.monotonic()
    env = {**os.environ, "RAY_ADDRESS": "local"}
    done = subprocess.run([sys.executable, script, "--model", tiny_model_dir, "--num-replicas", "64", "--port", str(testing.free_port())], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and time.monotonic() - start < 60
    [error] = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert error.startswith("error: 64 replicas x 1 CPU = 64 CPU but this cluster has") and error.endswith("or fewer replicas (--num-replicas)")


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
    open_app = dolly_serve.build_app(ServeConfig(**common, max_batch_size=16))
    keyed_app = dolly_serve.build_app(ServeConfig(**common, model_name="keyed", api_key=KEY))
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

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    name = default_model_name(tiny_model_dir)
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
    # As the exported chat template reads it: the system message is the Input block.
    [with_input] = generator.generate([(instruction, "Be brief.")], GREEDY)
    assert chat.choices[0].message.content == with_input.response
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
    instructions = [f"Request {i}: repeat the word {'abcdefgh'[i % 8] * (1 + i % 5)}." for i in range(64)]

    def ask(instruction):
        return _post(f"{server}/generate", {"instruction": instruction, "temperature": 0})

    before = requests.get(f"{server}/v1/stats", timeout=30).json()
    with ThreadPoolExecutor(64) as pool:
        replies = list(pool.map(ask, instructions))
    assert [r.status_code for r in replies] == [200] * 64
    expected = generator.generate(instructions, GREEDY, batch_size=1)
    assert [r.json()["response"] for r in replies] == [e.response for e in expected]  # each answer went to its own request
    after = requests.get(f"{server}/v1/stats", timeout=30).json()
    assert after["requests"] - before["requests"] == 64
    assert after["peak_shared_batch"] >= 8  # decoded together, not one after another


@pytest.mark.slow
def test_concurrent_streamed_chats_share_batches_and_equal_their_whole_answers(server, generator, tiny_model_dir):
    """16 users streaming at once through the official client: one running batch, and
    each stream joins to the answer the same request gets whole (and the generator gives alone)."""
    import openai

    name = default_model_name(tiny_model_dir)
    chats = [[{"role": "user", "content": f"Chat {i}: spell {'abcdefgh'[i % 8] * (2 + i % 4)} backwards."}] for i in range(16)]

    async def streamed(client, messages):
        text, reasons = "", []
        async for chunk in await client.chat.completions.create(model=name, messages=messages, temperature=0, stream=True):
            text += chunk.choices[0].delta.content or ""
            reasons.append(chunk.choices[0].finish_reason)
        return text, [r for r in reasons if r]

    async def whole(client, messages):
        reply = await client.chat.completions.create(model=name, messages=messages, temperature=0)
        return reply.choices[0].message.content, [reply.choices[0].finish_reason]

    async def all_at_once(ask):
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0) as client:
            return await asyncio.gather(*(ask(client, m) for m in chats))

    streams = asyncio.run(all_at_once(streamed))
    stats = requests.get(f"{server}/v1/stats", timeout=30).json()
    wholes = asyncio.run(all_at_once(whole))
    expected = generator.generate([m[-1]["content"] for m in chats], GREEDY, batch_size=1)
    assert streams == wholes == [(e.response, [e.finish_reason]) for e in expected]
    assert stats["peak_shared_batch"] >= 8 and stats["running"] == 0


@pytest.mark.slow
def test_a_client_that_disconnects_cancels_its_stream(server):
    before = requests.get(f"{server}/v1/stats", timeout=30).json()
    # Greedy, the tiny random model writes 810 tokens before ### End: the hang-up comes first.
    body = {"messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": LIMIT, "temperature": 0, "stream": True}
    with requests.post(f"{server}/v1/chat/completions", json=body, stream=True, timeout=120) as reply:
        assert reply.status_code == 200
        next(reply.iter_lines())  # the first event (the assistant role), then hang up
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = requests.get(f"{server}/v1/stats", timeout=30).json()
        if stats["cancelled"] > before["cancelled"]:
            break
        time.sleep(0.2)
    assert stats["cancelled"] == before["cancelled"] + 1 and stats["running"] == 0


@pytest.mark.slow
def test_requests_with_different_parameters_in_one_batch(server, generator):
    asks = [
        {"instruction": "Name a color.", "temperature": 0, "max_new_tokens": 4},
        {"instruction": "Name a color.", "temperature": 0, "max_new_tokens": 9},
        {"instruction": "Name a fruit.", "temperature": 0.8, "top_p": 0.9, "seed": 7, "max_new_tokens": 6},
        {"instruction": "Name a fruit.", "temperature": 0},
        {"instruction": "Name a fruit.", "temperature": 0.8, "top_p": 0.9, "seed": 8, "max_new_tokens": 6},
    ] * 4
    with ThreadPoolExecutor(len(asks)) as pool:
        replies = list(pool.map(lambda body: _post(f"{server}/generate", body), asks))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]
    for body, reply in zip(asks, replies, strict=True):
        max_new_tokens = body.get("max_new_tokens", MAX_NEW_TOKENS)
        assert reply.json()["usage"]["completion_tokens"] <= max_new_tokens
        if body["temperature"] == 0:
            [expected] = generator.generate([body["instruction"]], GenerationParams(greedy=True, max_new_tokens=max_new_tokens))
        else:  # a seeded sample is the generator's sample for that seed
            params = GenerationParams(temperature=body["temperature"], top_p=body["top_p"], seed=body["seed"], max_new_tokens=max_new_tokens)
            [expected] = generator.generate([body["instruction"]], params)
        assert reply.json()["response"] == expected.response
    sampled = {body["seed"]: reply.json()["response"] for body, reply in zip(asks, replies, strict=True) if "seed" in body}
    assert sampled[7] != sampled[8]


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
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).completions.create(model="keyed", prompt="hi")
    chat = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0).chat.completions.create(model="keyed", messages=[USER], temperature=0)
    assert chat.choices[0].message.content == generator.generate(["hi"], GREEDY)[0].response
