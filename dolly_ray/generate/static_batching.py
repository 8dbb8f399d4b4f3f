"""Static batching: whole requests with equal settings meet in ``@serve.batch`` and share
one ``InstructionGenerator.generate`` call, which runs to the batch's longest answer.

Serve's engine for models whose attention cannot run in transformers' continuous
batching (its paged KV cache needs every attention layer to hand it the forward's
arguments, which GPT-NeoX's does not), and the baseline the serving benchmark measures
continuous batching against. It has ``ContinuousBatcher``'s interface; a stream gets
its whole text when its batch ends.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses

from ray import serve

from dolly_ray.generate.generator import GenerationParams, GenerationResult, InstructionGenerator, Request

# How long a request waits for others to share its batch: tuned for a lone request's latency.
BATCH_WAIT_TIMEOUT_S = 0.02


class StaticBatcher:
    """Batches of up to ``max_batch_size`` requests on one model, one ``generate`` at a time."""

    batching = "static"

    def __init__(self, generator: InstructionGenerator, max_batch_size: int, batch_wait_timeout_s: float = BATCH_WAIT_TIMEOUT_S):
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
        """As ``ContinuousBatcher.generate``: with ``stream``, the response as one piece; then its result."""
        result = await self.generate_batch((request, params))
        if stream and result.response:
            yield result.response
        yield result

    async def answer(self, request: Request, params: GenerationParams) -> GenerationResult:
        return await self.generate_batch((request, params))

    def peak_shared(self) -> int:
        """The largest batch so far."""
        return max(self.batch_sizes, default=0)

    def is_running(self) -> bool:
        return True

    def stop(self) -> None:
        pass
