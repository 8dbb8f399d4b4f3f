"""InstructionGenerator: stop at ### End, order under length sorting, left truncation."""

import dataclasses
import random

import pytest
import torch

from dolly_ray import prompts, testing
from dolly_ray.generate.generator import GenerationParams, GenerationResult, InstructionGenerator, default_dtype, length_sorted_batches

GREEDY = GenerationParams(greedy=True, max_new_tokens=16)


@pytest.fixture(scope="module")
def scripted(tiny_model_dir):
    """A GPT-J rigged so that greedy decoding after any prompt says "xyz" then ### End.

    The blocks add nothing to the residual stream, so the last position's hidden state
    is its own token's embedding; the embeddings and lm_head form a chain
    "\\n" -> x -> y -> z -> ### End. Every prompt ends with the response key and "\\n".
    """
    from transformers import AutoModelForCausalLM

    tokenizer = prompts.load_tokenizer(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    newline = tokenizer(prompts.format_prompt("anything"))["input_ids"][-1]
    x, y, z = (tokenizer.encode(c)[0] for c in "xyz")
    chain = [newline, x, y, z, prompts.add_special_tokens(tokenizer).end]
    assert len(set(chain)) == len(chain)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.out_proj.weight.zero_()
            block.mlp.fc_out.weight.zero_()
            block.mlp.fc_out.bias.zero_()
        model.transformer.ln_f.weight.fill_(1.0)
        model.transformer.ln_f.bias.zero_()
        wte, head = model.transformer.wte.weight, model.lm_head
        wte.zero_()
        head.weight.zero_()
        head.bias.zero_()
        for k, (token, following) in enumerate(zip(chain, chain[1:])):
            direction = torch.zeros(wte.shape[1])
            direction[2 * k], direction[2 * k + 1] = 1.0, -1.0
            wte[token] = direction
            head.weight[following] = 10 * direction
    return InstructionGenerator(model, tokenizer)


def test_stops_at_end_key(scripted, monkeypatch):
    requests = ["Reverse the letters of the word.", ("Sort the numbers.", "3 1 2"), {"instruction": "Say hi", "input": None}]
    widths = []
    generate = scripted.model.generate

    def spy(**kwargs):
        output = generate(**kwargs)
        widths.append(output.shape[1] - kwargs["input_ids"].shape[1])
        return output

    monkeypatch.setattr(scripted.model, "generate", spy)
    results = scripted.generate(requests, GREEDY, batch_size=2)
    assert widths == [4, 4]  # generation itself stopped at ### End, well before max_new_tokens
    for result, request in zip(results, requests, strict=True):
        assert result.response == "xyz"
        assert result.finish_reason == "stop"
        assert result.num_generated_tokens == 4  # x, y, z and ### End
        assert result.truncated is False
    texts = [prompts.format_prompt(requests[0]), prompts.format_prompt(*requests[1]), prompts.format_prompt("Say hi")]
    assert [r.num_prompt_tokens for r in results] == [len(ids) for ids in scripted.tokenizer(texts)["input_ids"]]


def test_max_new_tokens_gives_length(scripted):
    (result,) = scripted.generate(["Reverse the letters of the word."], GenerationParams(greedy=True, max_new_tokens=2))
    assert (result.response, result.finish_reason, result.num_generated_tokens) == ("xy", "length", 2)


def test_sampling_follows_the_model_and_the_seed(scripted, generator):
    params = GenerationParams(temperature=0.7, top_p=0.92, top_k=0, max_new_tokens=8, seed=3)
    assert scripted.generate(["Say hi"], params)[0].response == "xyz"  # the chain dominates any sample
    first = generator.generate(["Say hi", "Name a colour."], params)
    assert generator.generate(["Say hi", "Name a colour."], params) == first
    # Another seed samples other tokens from the random model (a generator ignoring the seed would not).
    other = generator.generate(["Say hi", "Name a colour."], dataclasses.replace(params, seed=4))
    assert [r.response for r in other] != [r.response for r in first]


def test_end_key_spelled_out_in_plain_tokens(generator):
    """Without the ### End id, a textual ### End still ends the response (prompts.extract_response)."""
    tokenizer = generator.tokenizer
    ids = tokenizer.encode("hello") + tokenizer.encode("#") * 3 + tokenizer.encode(" End")
    assert generator.ids.end not in ids
    result = generator.result(ids, 10, False)
    assert (result.response, result.finish_reason, result.num_generated_tokens) == ("hello", "length", len(ids))


def test_results_keep_input_order(generator):
    rng = random.Random(0)
    instructions = [" ".join(["Reverse the letters of the word"] * rng.randint(1, 12)) + f" {i}." for i in range(11)]
    rng.shuffle(instructions)
    alone = [generator.generate([i], GREEDY)[0] for i in instructions]
    together = generator.generate(instructions, GREEDY, batch_size=4)
    capped = generator.generate(instructions, GREEDY, batch_size=8, max_batch_tokens=400)
    assert len({r.num_prompt_tokens for r in alone}) > 5  # lengths really differ, so sorting reorders
    assert together == alone
    assert capped == alone


def test_batches_are_length_sorted_and_capped():
    assert length_sorted_batches([5, 1, 9, 3, 3, 7], batch_size=2) == [[2, 5], [0, 3], [4, 1]]
    assert length_sorted_batches([5, 1, 9, 3, 3, 7], batch_size=10, max_batch_tokens=20) == [[2, 5], [0, 3, 4, 1]]
    assert length_sorted_batches([50, 2], batch_size=4, max_batch_tokens=10) == [[0], [1]]  # a long row still runs alone
    assert length_sorted_batches([], batch_size=3) == []


def test_long_prompt_is_truncated_from_the_left(tmp_path):
    path = testing.build_model(tmp_path / "short-context", n_positions=64)
    generator = InstructionGenerator.from_pretrained(str(path))
    long_instruction = "Reverse the letters of the word " + "abcdefghij " * 30
    params = GenerationParams(greedy=True, max_new_tokens=8)
    short, long = generator.generate(["Say hi", long_instruction], params)
    assert long.truncated and long.num_prompt_tokens == 64 - 8
    assert not short.truncated and short.num_prompt_tokens < 56
    assert long.num_generated_tokens >= 1
    with pytest.raises(ValueError, match="no room"):
        generator.generate(["Say hi"], GenerationParams(greedy=True, max_new_tokens=63))


def test_empty_request_list(generator):
    assert generator.generate([], GREEDY) == []


def test_results_are_plain_values(generator):
    (result,) = generator.generate(["Say hi"], GenerationParams(greedy=True, max_new_tokens=3))
    assert isinstance(result, GenerationResult)
    assert isinstance(result.response, str) and result.finish_reason in ("stop", "length")
    assert isinstance(result.num_prompt_tokens, int) and isinstance(result.num_generated_tokens, int)


def test_restores_training_mode(scripted):
    scripted.model.train()
    scripted.generate(["Say hi"], GenerationParams(greedy=True, max_new_tokens=1))
    assert scripted.model.training
    scripted.model.eval()


def test_model_without_rows_for_the_prompt_keys_is_refused(tiny_model_dir):
    from transformers import AutoTokenizer, GPTJConfig, GPTJForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = GPTJForCausalLM(GPTJConfig(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, rotary_dim=4))
    with pytest.raises(ValueError, match="do not fit"):
        InstructionGenerator(model, tokenizer)


def test_a_tiny_model_with_an_english_tokenizer_has_rows_for_the_prompt_keys(tmp_path):
    """The benchmarks' tiny model: a tokenizer trained on real text fills its whole
    vocabulary, and the model still has embeddings for the keys added on top, as GPT-J has."""
    corpus = [f"Item {i} of {i * 7} costs {i % 13} coins." for i in range(1000)]
    path = testing.build_model(tmp_path, tokenizer_corpus=corpus, tokenizer_vocab_size=600)
    generator = InstructionGenerator.from_pretrained(str(path))
    assert generator.model.get_input_embeddings().weight.shape[0] >= len(generator.tokenizer) > 512
    assert generator.generate(["Name a colour."], GenerationParams(greedy=True, max_new_tokens=2))[0].num_generated_tokens >= 1


def test_defaults():
    assert default_dtype("cpu") == torch.float32
    assert GenerationParams().top_p == 0.92 and GenerationParams().top_k == 0
    assert GenerationParams().max_new_tokens == 256 and not GenerationParams().greedy
    with pytest.raises(ValueError):
        GenerationParams(temperature=0).validate()


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_gpus_generate_in_bf16_where_supported_else_fp16(bf16, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert default_dtype("cuda") == default_dtype(torch.device("cuda", 1)) == expected
