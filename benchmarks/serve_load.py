"""HTTP load on the Serve deployment: continuous batching vs static batching, streamed and whole.

Starts a local Ray and Serve on 127.0.0.1 and deploys a model (a tiny random GPT-J built
here unless --model is given) twice: with the server's continuous batching, and with
static batching (the server before it: whole requests with equal settings meet in
``@serve.batch`` for up to --batch-wait-timeout-s and share one ``generate`` call, which
runs to the batch's longest answer; a stream gets its text when its batch ends). Clients
are the official ``openai`` client's coroutines on one event loop, sending greedy chat
requests with and without ``stream=True`` at each --concurrency. Prints requests/s,
time to first token (streams) or latency (whole) p50/p99 and mean inter-token latency,
and ends with one JSON line holding all figures and the goals' ratios:
streamed throughput at the top concurrency over one-at-a-time (concurrency 1), and
TTFT p99 at concurrency 32 over TTFT p99 at concurrency 1; the same for the engine alone
(--engines continuous-no-http), which tells the engine's scaling from the serving stack's.

    python benchmarks/serve_load.py                 # several minutes on 2 CPU cores
    python benchmarks/serve_load.py --model runs/gptj/checkpoint_000010/hf --num-gpus-per-replica 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ray import serve  # noqa: E402

from dolly_ray.generate.generator import GenerationParams
from dolly_ray.generate.static_batching import StaticBatcher
from dolly_ray.serve.server import InstructionServer


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="model directory (default: build a tiny random GPT-J)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64], help="client concurrency levels")
    p.add_argument("--requests-per-client", type=int, default=4, help="requests each client sends per run (plus a floor of 16 per run)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--max-batch-size", type=int, default=64, help="most requests decoded together, in both engines")
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.15, help="static batching's wait for a batch to fill")
    p.add_argument("--engines", nargs="+", default=["continuous", "static", "continuous-no-http"], choices=["continuous", "static", "continuous-no-http"],
                   help="continuous-no-http: the replica's ContinuousBatcher driven in this process, without Serve, HTTP or the client")
    p.add_argument("--num-cpus-per-replica", type=float, default=1.0)
    p.add_argument("--num-gpus-per-replica", type=float, default=0.0)
    p.add_argument("--smoke", action="store_true", help="the smallest sizes, so CI checks the script still runs (its figures mean nothing)")
    args = p.parse_args()
    if args.smoke:
        vars(args).update(concurrency=[1, 2], requests_per_client=1, max_new_tokens=4, max_batch_size=4)
    return args


@serve.deployment
class StaticBatchServer(InstructionServer.func_or_class):
    batch_wait_timeout_s = 0.15  # set from --batch-wait-timeout-s before deploying

    def start_engine(self, generator):
        return StaticBatcher(generator, self.config.max_batch_size, self.batch_wait_timeout_s)


def load(url: str, model: str, concurrency: int, total: int, max_new_tokens: int, stream: bool) -> dict:
    return asyncio.run(_load(url, model, concurrency, total, max_new_tokens, stream))


def prompt(i: int) -> str:
    return f"Write a sentence about the number {i}."


def load_engine(batcher, concurrency: int, total: int, max_new_tokens: int, stream: bool) -> dict:
    """``load`` without the serving stack: the same requests straight to a ContinuousBatcher."""
    params = GenerationParams(max_new_tokens=max_new_tokens, greedy=True)
    first_token: list[float] = []
    pending = iter(range(total))

    async def client() -> None:
        for i in pending:
            start = time.perf_counter()
            first = None
            async for _ in batcher.generate(prompt(i), params, stream=stream):
                first = first or time.perf_counter() - start  # streams: the first text; whole: the result
            first_token.append(first)

    async def run() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return time.perf_counter() - start

    return figures(total, asyncio.run(run()), first_token, stream)


def figures(total: int, elapsed: float, first_token: list[float], stream: bool) -> dict:
    """Requests/s and p50/p99 of the time to the first text (streams) or the latency (whole)."""
    first_token = sorted(first_token)
    return {
        "requests": total,
        "requests_per_s": round(total / elapsed, 2),
        "ttft_p50_s" if stream else "latency_p50_s": round(statistics.median(first_token), 4),
        "ttft_p99_s" if stream else "latency_p99_s": round(first_token[min(len(first_token) - 1, int(0.99 * len(first_token)))], 4),
    }


async def _load(url: str, model: str, concurrency: int, total: int, max_new_tokens: int, stream: bool) -> dict:
    import openai

    first_token: list[float] = []  # streams: time to the first text; whole: the latency
    token_gaps: list[float] = []  # streams: mean time between text chunks, per request
    pending = iter(range(total))  # shared: each request number is taken by one client

    async def client(api: openai.AsyncOpenAI) -> None:
        for i in pending:
            messages = [{"role": "user", "content": prompt(i)}]
            start = time.perf_counter()
            if not stream:
                await api.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_new_tokens)
                first_token.append(time.perf_counter() - start)
                continue
            arrivals = []
            async for chunk in await api.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_new_tokens, stream=True):
                if chunk.choices and chunk.choices[0].delta.content:
                    arrivals.append(time.perf_counter())
            first_token.append(arrivals[0] - start)
            if len(arrivals) > 1:
                token_gaps.append((arrivals[-1] - arrivals[0]) / (len(arrivals) - 1))

    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600) as api:
        start = time.perf_counter()
        await asyncio.gather(*(client(api) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    result = figures(total, elapsed, first_token, stream)
    if stream:
        result["inter_token_s"] = round(statistics.mean(token_gaps), 4) if token_gaps else None
    return result


def main() -> None:
    args = parse_args()
    from dolly_ray import testing

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(testing.build_model(os.path.join(tmp, "tiny-gptj")))
        runs = run_served(model, args, [e for e in args.engines if e != "continuous-no-http"])
        if "continuous-no-http" in args.engines:
            runs.update(run_engine_alone(model, args))

    summary = {"model": args.model or "tiny random GPT-J", "max_new_tokens": args.max_new_tokens, "max_batch_size": args.max_batch_size, "runs": runs}
    for engine in ("continuous", "continuous-no-http"):
        streamed = runs.get(f"{engine}, streamed", {})
        if {"1", "32"} <= set(streamed):
            summary[f"{engine}: streamed_throughput_32_over_1"] = round(streamed["32"]["requests_per_s"] / streamed["1"]["requests_per_s"], 2)
            summary[f"{engine}: ttft_p99_32_over_1"] = round(streamed["32"]["ttft_p99_s"] / streamed["1"]["ttft_p99_s"], 2)
    if {"continuous", "static"} <= set(args.engines) and "32" in runs["continuous, streamed"]:
        summary["streamed_throughput_32_continuous_over_static"] = round(
            runs["continuous, streamed"]["32"]["requests_per_s"] / runs["static, streamed"]["32"]["requests_per_s"], 2
        )
    print(json.dumps(summary))


def run_served(model: str, args: argparse.Namespace, engines: list[str]) -> dict:
    """Each engine deployed in turn on a local Ray and Serve, under the clients' load."""
    import ray
    import requests

    from dolly_ray import testing
    from dolly_ray.serve.config import ServeConfig
    from dolly_ray.serve.server import build_app

    runs: dict[str, dict] = {}
    if not engines:
        return runs
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    port = testing.free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    for engine in engines:
        config = ServeConfig(
            model=model,
            model_name="bench",
            max_batch_size=args.max_batch_size,
            max_ongoing_requests=2 * max(args.concurrency),
            max_new_tokens_limit=max(args.max_new_tokens, 1024),
            num_cpus_per_replica=args.num_cpus_per_replica,
            num_gpus_per_replica=args.num_gpus_per_replica,
        )
        app = build_app(config)
        if engine == "static":
            StaticBatchServer.func_or_class.batch_wait_timeout_s = args.batch_wait_timeout_s
            app = StaticBatchServer.options(**_deployment_options(app)).bind(*app._bound_deployment.init_args)
        serve.run(app, name="serve_load", route_prefix="/")
        load(url, "bench", 4, 8, args.max_new_tokens, stream=True)  # warm up
        for stream in (True, False):
            label = f"{engine}, {'streamed' if stream else 'whole'}"
            runs[label] = {}
            for concurrency in args.concurrency:
                total = max(16, concurrency * args.requests_per_client)
                result = load(url, "bench", concurrency, total, args.max_new_tokens, stream)
                runs[label][str(concurrency)] = result
                print(f"{label:20s} concurrency={concurrency:<3d} " + "  ".join(f"{k} {v}" for k, v in result.items() if k != "requests"), flush=True)
        runs[f"{engine}, stats"] = requests.get(f"{url}/v1/stats", timeout=30).json()
        serve.delete("serve_load")
    serve.shutdown()
    ray.shutdown()
    return runs


def run_engine_alone(model: str, args: argparse.Namespace) -> dict:
    """The replica's engine in this process, loaded as the replica loads it (one CPU thread
    for one CPU per replica), under the same load without Serve, HTTP or the client."""
    import torch

    from dolly_ray.generate.continuous_batching import ContinuousBatcher
    from dolly_ray.generate.generator import InstructionGenerator

    torch.set_num_threads(max(1, int(args.num_cpus_per_replica)))
    batcher = ContinuousBatcher(InstructionGenerator.from_pretrained(model), max_requests_per_batch=args.max_batch_size)
    runs: dict[str, dict] = {}
    try:
        load_engine(batcher, 4, 8, args.max_new_tokens, stream=True)  # warm up
        for stream in (True, False):
            label = f"continuous-no-http, {'streamed' if stream else 'whole'}"
            runs[label] = {}
            for concurrency in args.concurrency:
                result = load_engine(batcher, concurrency, max(16, concurrency * args.requests_per_client), args.max_new_tokens, stream)
                runs[label][str(concurrency)] = result
                print(f"{label:30s} concurrency={concurrency:<3d} " + "  ".join(f"{k} {v}" for k, v in result.items() if k != "requests"), flush=True)
    finally:
        batcher.stop()
    return runs


def _deployment_options(app) -> dict:
    deployment = app._bound_deployment
    return {"ray_actor_options": deployment.ray_actor_options, "max_ongoing_requests": deployment.max_ongoing_requests, "num_replicas": deployment.num_replicas}


if __name__ == "__main__":
    main()
