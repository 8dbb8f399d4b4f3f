"""ContinuousBatcher, Serve's engine: requests that arrive together decode together, and
each answer, streamed or whole, is the one InstructionGenerator gives alone."""

import asyncio

import pytest

from dolly_ray.generate.continuous_batching import ContinuousBatcher, Unsupported, kv_cache_blocks
from dolly_ray.generate.generator import GenerationParams, GenerationResult, InstructionGenerator

GREEDY = GenerationParams(greedy=True, max_new_tokens=24)
REQUESTS = ["Reverse the word.", ("Sort the numbers.", "3 1 2"), "x" * 40, "Name a color.", "Give three tips for staying healthy."] * 3


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    batcher = ContinuousBatcher(InstructionGenerator.from_pretrained(tiny_model_dir), max_requests_per_batch=16)
    yield batcher
    batcher.stop()
    assert not batcher.is_running()


async def _collect(engine, request, params, stream):
    return [item async for item in engine.generate(request, params, stream=stream)]


def test_concurrent_requests_share_the_batch_and_get_their_own_answers(engine, generator):
    expected = generator.generate(REQUESTS, GREEDY, batch_size=1)

    async def all_at_once():
        return await asyncio.gather(*(_collect(engine, r, GREEDY, stream=i % 2 == 0) for i, r in enumerate(REQUESTS)))

    replies = asyncio.run(all_at_once())
    for i, (items, result) in enumerate(zip(replies, expected, strict=True)):
        *pieces, final = items
        assert final == result
        if i % 2 == 0:  # streamed: text pieces that join to the answer
            assert all(isinstance(p, str) and p for p in pieces)
            assert "".join(pieces) == result.response
        else:
            assert pieces == []
    assert engine.peak_shared() >= len(REQUESTS) // 2  # they were decoded in shared steps, not one after another
    assert engine.running == 0


def test_a_stream_comes_in_pieces(engine, generator):
    [result] = generator.generate(["Give three tips for staying healthy."], GREEDY)
    *pieces, final = asyncio.run(_collect(engine, "Give three tips for staying healthy.", GREEDY, stream=True))
    assert final == result and len(pieces) > 1


def test_a_reader_that_goes_away_cancels_its_request(engine):
    long = GenerationParams(greedy=True, max_new_tokens=1500)
    cancelled = engine.cancelled

    async def read_one_piece_then_leave():
        pieces = engine.generate("Write a long story.", long, stream=True)
        first = await anext(pieces)
        await pieces.aclose()
        return first

    assert isinstance(asyncio.run(read_one_piece_then_leave()), str)
    assert engine.cancelled == cancelled + 1 and engine.running == 0
    assert not engine.manager.output_router.result_handlers
    # The loop carries on serving others.
    [final] = asyncio.run(_collect(engine, "Name a color.", GREEDY, stream=False))
    assert isinstance(final, GenerationResult)


def test_seeded_sampling_is_reproducible_and_matches_the_generator(engine, generator):
    params = GenerationParams(temperature=0.9, top_p=0.95, max_new_tokens=12, seed=11)
    [expected] = generator.generate(["Name a fruit."], params)
    for _ in range(2):
        assert asyncio.run(engine.answer("Name a fruit.", params)) == expected
    other_params = GenerationParams(temperature=0.9, top_p=0.95, max_new_tokens=12, seed=12)
    [other] = generator.generate(["Name a fruit."], other_params)
    assert other.response != expected.response

    async def at_once():  # two seeds asked together still draw from their own streams
        return await asyncio.gather(*(engine.answer("Name a fruit.", p) for p in [params, other_params] * 3))

    assert asyncio.run(at_once()) == [expected, other] * 3


def test_sampling_without_a_seed_varies_and_respects_the_limit(engine):
    params = GenerationParams(temperature=1.5, top_p=1.0, max_new_tokens=10)

    async def many():
        return await asyncio.gather(*(engine.answer("Name a fruit.", params) for _ in range(8)))

    results = asyncio.run(many())
    assert all(r.num_generated_tokens <= 10 for r in results)
    assert len({r.response for r in results}) > 1  # a random model sampled at temperature 1.5


def test_kv_cache_blocks_fill_the_memory_given(engine):
    model = engine.generator.model
    config = model.config
    bytes_per_token = 2 * config.n_layer * config.n_embd * 4  # keys and values, fp32
    blocks = kv_cache_blocks(model, 0.25, 256)
    assert blocks * 256 * bytes_per_token <= 0.25 * 2**30 < (blocks + 1) * 256 * bytes_per_token
    assert kv_cache_blocks(model, 1e-9, 256) == 1


def test_a_model_that_cannot_run_in_it_fails_at_start_and_still_generates(family_model_dir):
    """GPT-NeoX's attention does not hand transformers' paged cache the forward's arguments:
    the batcher refuses it before any request (Serve then batches statically), and the
    model keeps its own attention for plain generation."""
    generator = InstructionGenerator.from_pretrained(family_model_dir("gpt_neox"))
    [before] = generator.generate(REQUESTS[:1], GREEDY)
    with pytest.raises(Unsupported, match="GPTNeoXForCausalLM cannot run in transformers' continuous batching"):
        ContinuousBatcher(generator)
    assert generator.generate(REQUESTS[:1], GREEDY) == [before]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_llama_style_families_answer_as_the_generator(family, family_model_dir, tmp_path):
    """Grouped-query attention, Mistral's sliding window (shorter than prompt and answer
    here) and Qwen2's tied embeddings in the paged cache; the model is the base with rows
    for the prompt keys, as an export has them."""
    from transformers import AutoModelForCausalLM

    from dolly_ray import prompts, testing

    base = family_model_dir(family)
    tokenizer, model = prompts.load_tokenizer(base), AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    generator = InstructionGenerator.from_pretrained(str(tmp_path))
    expected = generator.generate(REQUESTS[:5], GREEDY, batch_size=1)
    batcher = ContinuousBatcher(generator)
    try:

        async def all_at_once():
            return await asyncio.gather(*(_collect(batcher, r, GREEDY, stream=i % 2 == 0) for i, r in enumerate(REQUESTS[:5])))

        replies = asyncio.run(all_at_once())
    finally:
        batcher.stop()
    assert [items[-1] for items in replies] == expected
    assert all(e.num_prompt_tokens + e.num_generated_tokens > testing.MISTRAL_SLIDING_WINDOW for e in expected)
