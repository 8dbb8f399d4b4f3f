"""The vllm engine on the demo's checkpoint: vLLM's CPU build through ray.data.llm (the
batch job) and ray.serve.llm (the Serve app), started as a user starts them, answering
as the hf engine answers. Runs in .venv-vllm: `make test-vllm`."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import requests

pytest.importorskip("vllm")

from dolly_ray import prompts, testing
from dolly_ray.batch import output as batch_output
from dolly_ray.generate import scoring
from dolly_ray.generate.generator import GenerationParams, InstructionGenerator
from dolly_ray.serve.config import default_model_name

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = 24
GREEDY = GenerationParams(greedy=True, max_new_tokens=TOKENS)
KEY = "vllm-test-key"
BODY_LIMIT = 16 * 1024
BAD_ROWS = {3: {"instruction": 5}, 10: {"input": "no instruction"}, 17: {"instruction": "  "}}


@pytest.fixture(scope="module")
def demo():
    """The demo's summary and held-out records (make test-vllm trains the demo if the main suite did not)."""
    where = os.environ.get("DOLLY_RAY_DEMO_DIR", os.path.join(ROOT, "build", "demo"))
    path = os.path.join(where, "summary.json")
    if not os.path.exists(path):
        pytest.fail(f"no demo run at {where}: run `make test-vllm`, which trains it first")
    with open(path) as f:
        summary = json.load(f)
    with open(os.path.join(where, "data", "heldout.jsonl")) as f:
        heldout = [json.loads(line) for line in f][:30]
    return summary, heldout


@pytest.fixture(scope="module")
def hf_answers(demo):
    """The hf engine's greedy answers to the held-out records, in this environment."""
    summary, heldout = demo
    generator = InstructionGenerator.from_pretrained(summary["hf_model"])
    return generator.generate([(r["instruction"], r["input"]) for r in heldout], GREEDY)


def _env() -> dict:
    return {**os.environ, "RAY_ADDRESS": "local", "VLLM_CPU_KVCACHE_SPACE": "1"}


def test_the_vllm_batch_job_answers_as_the_hf_engine_with_one_row_per_input_row(demo, hf_answers, tmp_path):
    summary, heldout = demo
    rows = [{"instruction": r["instruction"], "input": r["input"], "id": i} for i, r in enumerate(heldout)]
    for at, bad in sorted(BAD_ROWS.items()):
        rows.insert(at, {**bad, "id": f"bad-{at}"})
    source, output = tmp_path / "in.jsonl", tmp_path / "answers"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    command = [sys.executable, "jobs/batch_generate.py", "--engine", "vllm", "--model", summary["hf_model"], "--input", str(source), "--output", str(output), "--greedy", "--max-new-tokens", str(TOKENS)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT, env=_env())
    assert done.returncode == 0, done.stderr[-4000:]
    job = json.loads(done.stdout.splitlines()[-1])
    assert (job["rows"], job["errors"]) == (len(rows), len(BAD_ROWS))

    written = list(batch_output.read_rows(str(output)))
    assert [w["id"] for w in written] == [r["id"] for r in rows]  # one row per input row, in order
    good = [w for w in written if not str(w["id"]).startswith("bad")]
    for w, expected in zip(good, hf_answers, strict=True):
        assert (w["response"], w["finish_reason"], w["num_generated_tokens"], w["error"]) == (
            expected.response, expected.finish_reason, expected.num_generated_tokens, None
        ), w
    for at in BAD_ROWS:
        assert written[at]["error"] and written[at]["response"] is None
    assert scoring.exact_match([w["response"] for w in good], [r["output"] for r in heldout]) >= 0.9


@pytest.fixture(scope="module")
def vllm_server(demo):
    """`python jobs/serve.py --engine vllm` with an API key and a body limit, on a free 127.0.0.1 port."""
    summary, _ = demo
    port = testing.free_port()
    command = [
        sys.executable, "jobs/serve.py", "--engine", "vllm", "--model", summary["hf_model"], "--port", str(port),
        "--api-key", KEY, "--max-request-bytes", str(BODY_LIMIT), "--num-gpus-per-replica", "0",
        "--max-new-tokens", str(TOKENS), "--max-new-tokens-limit", "128",  # the demo model has 256 positions
    ]  # fmt: skip
    log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"vllm-serve-{port}.log"), "w")
    process = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:  # the server and its Ray go, whatever happens here or in the tests
        yield _wait_until_serving(process, f"http://127.0.0.1:{port}", log.name), default_model_name(summary["hf_model"]), process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the server's own Ray with it
        log.close()


def _wait_until_serving(process: subprocess.Popen, url: str, log: str) -> str:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert process.poll() is None, open(log).read()[-4000:]
        try:
            if requests.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=5).status_code == 200:
                return url
        except requests.RequestException:  # not listening yet, or the route not ready
            pass
        time.sleep(2)
    pytest.fail("the vllm app did not come up in 10 minutes:\n" + open(log).read()[-4000:])


def test_the_vllm_app_answers_chats_and_completions_as_the_hf_engine(vllm_server, demo, hf_answers):
    import openai

    url, name, _ = vllm_server
    _, heldout = demo
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == [name]
    for record, expected in list(zip(heldout, hf_answers, strict=True))[:8]:
        # The chat template of the export writes the Dolly prompt: a system message is the Input block.
        messages = ([{"role": "system", "content": record["input"]}] if record["input"] else []) + [{"role": "user", "content": record["instruction"]}]
        chat = client.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=TOKENS)
        assert (chat.choices[0].message.content.strip(), chat.choices[0].finish_reason) == (expected.response, expected.finish_reason)
        # vLLM's completions take the prompt as it is: the Dolly prompt written out.
        completion = client.completions.create(model=name, prompt=prompts.format_prompt(record["instruction"], record["input"]), temperature=0, max_tokens=TOKENS)
        assert completion.choices[0].text.strip() == expected.response
        chunks = client.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=TOKENS, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip() == expected.response


def test_the_vllm_app_is_gated_like_the_hf_app_and_survives_hostile_requests(vllm_server, hf_answers, demo):
    import test_hostile_traffic as hostile

    url, name, _ = vllm_server
    body = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}]:
        reply = requests.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert reply.status_code == 401 and reply.json()["error"]["type"] == "authentication_error", headers
    keyed = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    big = json.dumps({**body, "user": "x" * BODY_LIMIT}).encode()
    assert requests.post(f"{url}/v1/chat/completions", data=big, headers=keyed, timeout=60).status_code == 413
    chunked = iter([big[i : i + 4096] for i in range(0, len(big), 4096)])  # no declared length
    assert requests.post(f"{url}/v1/chat/completions", data=chunked, headers=keyed, timeout=60).status_code == 413

    # The hf app's hostile requests on the routes both apps serve: vLLM validates bodies its
    # own way, so the status may differ, but none may be a server error, and no key is 401.
    shared = [r for r in hostile.hostile_requests(hostile.SEED, 400) if r.path.removeprefix("/keyed") in ("/v1/completions", "/v1/chat/completions")]
    problems = []
    for request in shared:
        request.path = request.path.removeprefix("/keyed")
        if not request.kind.startswith("no_key"):
            request.headers = {**request.headers, "authorization": f"Bearer {KEY}"}
        status, _ = hostile._send(url, request)
        if not isinstance(status, int) or status >= 500 or (request.kind.startswith("no_key") and status != 401):
            problems.append(f"{request.kind} {request.path}: {status} {request.body if isinstance(request.body, bytes) and len(request.body) < 300 else ''}")
    assert len(shared) > 100 and not problems, "\n".join(problems)

    record, expected = demo[1][0], hf_answers[0]
    messages = ([{"role": "system", "content": record["input"]}] if record["input"] else []) + [{"role": "user", "content": record["instruction"]}]
    reply = requests.post(f"{url}/v1/chat/completions", json={"model": name, "messages": messages, "temperature": 0, "max_tokens": TOKENS}, headers=keyed, timeout=120)
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"].strip() == expected.response


def test_ctrl_c_stops_the_vllm_app(vllm_server):
    """Ctrl-C in the terminal (SIGINT to the foreground process group) removes the app and
    ends the command promptly."""
    _, _, process = vllm_server
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(30) == 0
