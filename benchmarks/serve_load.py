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
TTFT p99 at concurrency 32 over TTFT p99 at concurrency 1.

    python benchmarks/serve_load.py                 # several minutes on 2 CPU cores
    python benchmarks/serve_load.py --model runs/gptj/checkpoint_000010/hf --num-gpus-per-replica 1
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ray import serve  # noqa: E402

from dolly_ray.generation import GenerationParams, GenerationResult, Request  # noqa: E402
from dolly_ray.serve import InstructionServer  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="model directory (default: build a tiny random GPT-J)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64], help="client concurrency levels")
    p.add_argument("--requests-per-client", type=int, default=4, help="requests each client sends per run (plus a floor of 16 per run)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--max-batch-size", type=int, default=64, help="most requests decoded together, in both engines")
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.15, help="static batching's wait for a batch to fill")
    p.add_argument("--engines", nargs="+", default=["continuous", "static"], choices=["continuous", "static"])
    p.add_argument("--num-cpus-per-replica", type=float, default=1.0)
    p.add_argument("--num-gpus-per-replica", type=float, default=0.0)
    return p.parse_args()


class StaticBatcher:
    """Static batching with ``ContinuousBatcher``'s interface, for comparison only."""

    def __init__(self, generator, max_batch_size: int, batch_wait_timeout_s: float):
        self.generator = generator
        self.lock = asyncio.Lock()  # one generate() at a time on one model
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.running = self.cancelled = 0
        self.generate_batch.set_max_batch_size(max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch
    async def generate_batch(self, jobs: list[tuple[Request, GenerationParams]]) -> list[GenerationResult]:
        self.batch_sizes[len(jobs)] += 1
        groups: dict[tuple, list[int]] = collections.defaultdict(list)
        for i, (_, params) in enumerate(jobs):
            groups[dataclasses.astuple(params)].append(i)
        results: list = [None] * len(jobs)
        for indices in groups.values():
            async with self.lock:
                group = await asyncio.to_thread(self.generator.generate, [jobs[i][0] for i in indices], jobs[indices[0]][1], batch_size=len(indices))
            for i, result in zip(indices, group):
                results[i] = result
        return results

    async def generate(self, request: Request, params: GenerationParams, *, stream: bool = False):
        result = await self.generate_batch((request, params))
        if stream and result.response:
            yield result.response
        yield result

    async def answer(self, request: Request, params: GenerationParams) -> GenerationResult:
        return await self.generate_batch((request, params))

    def peak_shared(self) -> int:
        return max(self.batch_sizes, default=0)

    def is_running(self) -> bool:
        return True

    def stop(self) -> None:
        pass


@serve.deployment
class StaticBatchServer(InstructionServer.func_or_class):
    batch_wait_timeout_s = 0.15  # set from --batch-wait-timeout-s before deploying

    def start_engine(self, generator):
        return StaticBatcher(generator, self.config.max_batch_size, self.batch_wait_timeout_s)


def load(url: str, model: str, concurrency: int, total: int, max_new_tokens: int, stream: bool) -> dict:
    return asyncio.run(_load(url, model, concurrency, total, max_new_tokens, stream))


async def _load(url: str, model: str, concurrency: int, total: int, max_new_tokens: int, stream: bool) -> dict:
    import openai

    first_token: list[float] = []  # streams: time to the first text; whole: the latency
    token_gaps: list[float] = []  # streams: mean time between text chunks, per request
    pending = iter(range(total))  # shared: each request number is taken by one client

    async def client(api: openai.AsyncOpenAI) -> None:
        for i in pending:
            messages = [{"role": "user", "content": f"Write a sentence about the number {i}."}]
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
    first_token.sort()
    return {
        "requests": total,
        "requests_per_s": round(total / elapsed, 2),
        "ttft_p50_s" if stream else "latency_p50_s": round(statistics.median(first_token), 4),
        "ttft_p99_s" if stream else "latency_p99_s": round(first_token[min(len(first_token) - 1, int(0.99 * len(first_token)))], 4),
        **({"inter_token_s": round(statistics.mean(token_gaps), 4) if token_gaps else None} if stream else {}),
    }


def main() -> None:
    args = parse_args()
    import ray
    import requests

    from dolly_ray import testing
    from dolly_ray.serve import ServeConfig, build_app

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(testing.build_model(os.path.join(tmp, "tiny-gptj")))
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        port = testing.free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        runs: dict[str, dict] = {}
        for engine in args.engines:
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

    summary = {"model": args.model or "tiny random GPT-J", "max_new_tokens": args.max_new_tokens, "max_batch_size": args.max_batch_size, "runs": runs}
    if "continuous" in args.engines:
        streamed = runs["continuous, streamed"]
        if {"1", "32"} <= set(streamed):
            summary["streamed_throughput_32_over_1"] = round(streamed["32"]["requests_per_s"] / streamed["1"]["requests_per_s"], 2)
            summary["ttft_p99_32_over_1"] = round(streamed["32"]["ttft_p99_s"] / streamed["1"]["ttft_p99_s"], 2)
            if "static" in args.engines:
                summary["streamed_throughput_32_continuous_over_static"] = round(
                    streamed["32"]["requests_per_s"] / runs["static, streamed"]["32"]["requests_per_s"], 2
                )
    print(json.dumps(summary))


def _deployment_options(app) -> dict:
    deployment = app._bound_deployment
    return {"ray_actor_options": deployment.ray_actor_options, "max_ongoing_requests": deployment.max_ongoing_requests, "num_replicas": deployment.num_replicas}


if __name__ == "__main__":
    main()
