"""HTTP load on the Serve deployment: dynamic batching vs one request per generate call.

Starts a local Ray and Serve on 127.0.0.1, deploys a model (a tiny random GPT-J built
here unless --model is given) twice, with --max-batch-size and with max_batch_size=1,
and sends a fixed number of greedy /generate requests at concurrency 1, 8 and 32.
Prints requests/s, p50 and p99 latency per run, and ends with one JSON line holding
those figures and the batched/unbatched throughput ratio at the highest concurrency.

    python benchmarks/serve_load.py                 # about two minutes on 2 CPU cores
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

import aiohttp
import requests

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="model directory (default: build a tiny random GPT-J)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="client concurrency levels")
    p.add_argument("--requests-per-client", type=int, default=8, help="requests each client sends per run (plus a floor of 16 per run)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--max-batch-size", type=int, default=32, help="the batched deployment's max batch size")
    p.add_argument(
        "--batch-wait-timeout-s",
        type=float,
        default=0.15,
        help="the batched deployment's batch wait: long enough for a finished batch's clients to send "
        "their next requests, so batches stay whole (0.05 let them split into groups of 3-20 here)",
    )
    p.add_argument("--num-cpus-per-replica", type=float, default=1.0)
    p.add_argument("--num-gpus-per-replica", type=float, default=0.0)
    return p.parse_args()


def load(url: str, concurrency: int, total: int, max_new_tokens: int) -> dict:
    """``total`` greedy requests from ``concurrency`` clients; every one must succeed.

    The clients are coroutines on one event loop, so the load generator's own CPU use
    stays small beside the server's on a small machine (32 threads of ``requests``
    took a noticeable share of two cores).
    """
    return asyncio.run(_load(url, concurrency, total, max_new_tokens))


async def _load(url: str, concurrency: int, total: int, max_new_tokens: int) -> dict:
    latencies: list[float] = []
    pending = iter(range(total))  # shared: each request number is taken by one client

    async def client(session: aiohttp.ClientSession) -> None:
        for i in pending:
            body = {"instruction": f"Write a sentence about the number {i}.", "temperature": 0, "max_new_tokens": max_new_tokens}
            start = time.perf_counter()
            async with session.post(f"{url}/generate", json=body) as reply:
                reply.raise_for_status()
                await reply.read()
            latencies.append(time.perf_counter() - start)

    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "requests": total,
        "requests_per_s": round(total / elapsed, 2),
        "p50_s": round(statistics.median(latencies), 4),
        "p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 4),
    }


def main() -> None:
    args = parse_args()
    import ray
    from ray import serve

    from dolly_ray import testing
    from dolly_ray.serve import ServeConfig, build_app

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(testing.build_model(os.path.join(tmp, "tiny-gptj")))
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        port = testing.free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        runs: dict[str, dict] = {}
        stats: dict[str, dict] = {}
        for label, max_batch_size in [("batched", args.max_batch_size), ("unbatched", 1)]:
            config = ServeConfig(
                model=model,
                max_batch_size=max_batch_size,
                batch_wait_timeout_s=args.batch_wait_timeout_s,
                max_ongoing_requests=2 * max(args.concurrency),
                max_new_tokens_limit=max(args.max_new_tokens, 1024),
                num_cpus_per_replica=args.num_cpus_per_replica,
                num_gpus_per_replica=args.num_gpus_per_replica,
            )
            serve.run(build_app(config), name="serve_load", route_prefix="/")
            load(url, 4, 8, args.max_new_tokens)  # warm up
            runs[label] = {}
            for concurrency in args.concurrency:
                total = max(16, concurrency * args.requests_per_client)
                result = load(url, concurrency, total, args.max_new_tokens)
                runs[label][str(concurrency)] = result
                print(
                    f"{label:9s} max_batch_size={max_batch_size:<3d} concurrency={concurrency:<3d} "
                    f"{result['requests_per_s']:8.2f} req/s   p50 {result['p50_s']:.3f}s   p99 {result['p99_s']:.3f}s",
                    flush=True,
                )
            stats[label] = requests.get(f"{url}/v1/stats", timeout=30).json()
            serve.delete("serve_load")
        serve.shutdown()
        ray.shutdown()

    top = str(max(args.concurrency))
    ratio = runs["batched"][top]["requests_per_s"] / runs["unbatched"][top]["requests_per_s"]
    print(f"batched / unbatched throughput at concurrency {top}: {ratio:.1f}x (batch sizes seen: {stats['batched']['batch_sizes']})")
    summary = {
        "model": "tiny random GPT-J" if not args.model else args.model,
        "max_new_tokens": args.max_new_tokens,
        "max_batch_size": args.max_batch_size,
        "batched": runs["batched"],
        "unbatched": runs["unbatched"],
        "batched_batch_sizes": stats["batched"]["batch_sizes"],
        f"throughput_ratio_at_concurrency_{top}": round(ratio, 2),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
