"""Continuous batching: requests join the running batch as they arrive and leave as they end.

Serve's engine. ``InstructionGenerator.generate`` batches a fixed list of prompts and
decodes until its slowest row ends; here one transformers continuous-batching manager
(``model.init_continuous_batching``) runs a generation loop on its own thread over a
paged KV cache, and every request, streamed or whole, is added to it and read back on
the event loop. A request whose reader goes away is cancelled, freeing its cache pages
at the next step. Prompts, stops and the response cut are ``InstructionGenerator``'s,
so the answers are the same as the batch job's.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import math
import threading
import time
import uuid
from typing import AsyncIterator

import torch

from dolly_ray.generate.generator import GenerationParams, GenerationResult, InstructionGenerator, Request
from dolly_ray.models import embedding_rows

# On CPU transformers would size the KV cache to 60% of the machine's RAM and prefill 8192
# tokens per step, with an attention mask of that many rows over the whole cache.
CPU_KV_CACHE_GIB = 1.0
CPU_MAX_BATCH_TOKENS = 512
# The start-up check's one token: generous, since a replica may start on a busy machine.
FIRST_TOKEN_TIMEOUT_S = 120


class GenerationFailed(RuntimeError):
    """The generation loop reported an error for a request."""


class Unsupported(RuntimeError):
    """The model cannot run in transformers' continuous batching (its first token failed)."""


def kv_cache_blocks(model, gib: float, page_size: int) -> int:
    """How many whole-model blocks of ``page_size`` tokens (transformers' ``num_blocks``) fit in ``gib``."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    bytes_per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * model.dtype.itemsize  # keys and values
    return max(1, int(gib * 2**30) // (bytes_per_token * page_size))


class ContinuousBatcher:
    """One generation loop over one loaded model; ``generate`` may be awaited from many tasks at once."""

    batching = "continuous"

    def __init__(self, generator: InstructionGenerator, *, max_requests_per_batch: int = 16, kv_cache_gib: float | None = None):
        """``kv_cache_gib``: the KV cache's size; None leaves it to transformers on a GPU (most
        of the free memory) and takes ``CPU_KV_CACHE_GIB`` on CPU."""
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        self.generator = generator
        # torch's random stream is one per process: seeded requests take turns, or two
        # seeds drawing at once would each get a mix of both streams.
        self.seeded_turn = threading.Lock()
        model = generator.model
        cache = ContinuousBatchingConfig(per_request_processors=True, max_requests_per_batch=max_requests_per_batch)
        if model.device.type == "cpu":
            kv_cache_gib = CPU_KV_CACHE_GIB if kv_cache_gib is None else kv_cache_gib
            cache.max_batch_tokens = CPU_MAX_BATCH_TOKENS
        if kv_cache_gib is not None:
            cache.num_blocks = kv_cache_blocks(model, kv_cache_gib, cache.page_size)
            if generator.max_positions is not None:  # no more than a full batch of full contexts can use
                cache.num_blocks = min(cache.num_blocks, math.ceil(max_requests_per_batch * generator.max_positions / cache.page_size))
        # Every request sets its own temperature, top_k and top_p. These placeholders only
        # make transformers build the three per-request processors (it builds none for a
        # temperature of 1, top_k 0 or top_p 1); greedy is top_k 1.
        loop_config = GenerationConfig(
            do_sample=True, temperature=0.5, top_k=50, top_p=0.5, eos_token_id=generator.ids.end, pad_token_id=generator.ids.pad
        )
        with torch.inference_mode():  # the loop's thread keeps the inference mode it starts in
            self.manager = model.init_continuous_batching(generation_config=loop_config, continuous_batching_config=cache)
            self.manager.warmup()  # allocates the cache here, so a cache that does not fit fails now, not on the first request
            self.manager.start()
        self.vocab_size = embedding_rows(model)
        self.lifespans: collections.deque[tuple[float, float]] = collections.deque(maxlen=1024)
        self.running = self.cancelled = 0
        self._first_token()

    def _first_token(self) -> None:
        """One greedy token through the loop before any request, so that a model whose
        attention cannot use the paged cache (GPT-NeoX's does not hand it the forward's
        arguments) fails here, with ``Unsupported``, and not on a client's request."""
        [ids], _ = self.generator.prepare(["Say hi."], GenerationParams(greedy=True, max_new_tokens=1))
        request_id = self.manager.add_request(ids, max_new_tokens=1, eos_token_id=[self.generator.ids.end], **self.sampling(GenerationParams(greedy=True)))
        deadline, output = time.monotonic() + FIRST_TOKEN_TIMEOUT_S, None
        while output is None and self.manager.is_running() and time.monotonic() < deadline:  # a loop that died answers nothing
            output = self.manager.get_result(request_id=request_id, timeout=1)
        if output is None or output.error is not None:
            self.stop()  # also gives the model back its own attention implementation
            reason = "no answer in time" if output is None else output.error
            raise Unsupported(f"{type(self.generator.model).__name__} cannot run in transformers' continuous batching: {reason}")

    def is_running(self) -> bool:
        return self.manager.is_running()

    def stop(self) -> None:
        self.manager.stop(block=True, timeout=30)

    def sampling(self, params: GenerationParams) -> dict:
        """A request's own sampling arguments for the loop (top_k 0, "off", is the whole vocabulary)."""
        if params.greedy:
            return {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
        return {"temperature": params.temperature, "top_k": params.top_k or self.vocab_size, "top_p": params.top_p}

    async def generate(self, request: Request, params: GenerationParams, *, stream: bool = False) -> AsyncIterator[str | GenerationResult]:
        """With ``stream``, the response's settled text pieces as they are decoded (see
        ``InstructionGenerator.settled_text``); then, in every case, its GenerationResult.

        Closing the iterator before the result (a client that went away) cancels the request.
        A request with a seed runs alone, as ``InstructionGenerator.generate`` runs it, with
        the loop paused: a seed needs its own random stream, and the loop's is shared; its
        stream is then one piece.
        """
        if params.seed is not None:
            result = await asyncio.to_thread(self._generate_seeded, request, params)
            if stream and result.response:
                yield result.response
            yield result
            return
        [ids], [truncated] = self.generator.prepare([request], params)
        outputs: asyncio.Queue = asyncio.Queue()
        request_id = uuid.uuid4().hex
        self.manager.register_result_handler(request_id, outputs.put_nowait)
        added = self.manager.add_request(
            ids, request_id=request_id, max_new_tokens=params.max_new_tokens, streaming=stream, eos_token_id=[self.generator.ids.end], **self.sampling(params)
        )
        if added is None:
            self._forget(request_id)
            raise GenerationFailed("the generation loop is not accepting requests (it has stopped)")
        self.running += 1
        finished = False
        try:
            sent = ""
            while not (output := await self._latest(outputs)).is_finished():
                settled = self.generator.settled_text(output.generated_tokens)
                if len(settled) > len(sent):
                    yield settled[len(sent) :]
                    sent = settled
            finished = True
            if output.error is not None:
                raise GenerationFailed(output.error)
            self.lifespans.append(output.lifespan)
            result = self.generator.result(output.generated_tokens, len(ids), truncated)
            if stream and len(result.response) > len(sent):
                yield result.response[len(sent) :]
            yield result
        finally:
            self.running -= 1
            if not finished:
                self.manager.cancel_request(request_id)
                self._forget(request_id)
                self.cancelled += 1

    async def answer(self, request: Request, params: GenerationParams) -> GenerationResult:
        async for result in self.generate(request, params):
            return result  # type: ignore[return-value]
        raise AssertionError("unreachable: generate always ends with its result")

    @staticmethod
    async def _latest(outputs: asyncio.Queue):
        """The newest of the outputs waiting: each holds all tokens so far, so a reader that
        fell behind sends one larger piece instead of many (fewer events under load)."""
        output = await outputs.get()
        while not outputs.empty() and not output.is_finished():
            output = outputs.get_nowait()
        return output

    def _generate_seeded(self, request: Request, params: GenerationParams) -> GenerationResult:
        with self.seeded_turn, self.manager.pause():
            [result] = self.generator.generate([request], params)
        return result

    def _forget(self, request_id: str) -> None:
        """Drop a request's result handler: transformers removes it only when a result is delivered."""
        router = self.manager.output_router
        with router._lock:
            router.result_handlers.pop(request_id, None)

    def peak_shared(self) -> int:
        """The most recent requests (up to the last 1024) that were in the running batch at the same moment."""
        starts = sorted(start for start, _ in self.lifespans)
        ends = sorted(end for _, end in self.lifespans)
        return max((bisect.bisect_right(starts, start) - bisect.bisect_left(ends, start) for start in starts), default=0)
