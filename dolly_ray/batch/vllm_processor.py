"""The vllm engine in the batch job: a ``ray.data.llm`` processor on the exported
checkpoint with the hf engine's output columns, one row per input row (a bad row keeps
its ``error``), the same prompt truncation and response cut."""

from __future__ import annotations

import functools

from dolly_ray import models, prompts
from dolly_ray.batch.config import RESULT_SCHEMA, BatchConfig
from dolly_ray.generate import vllm_engine
from dolly_ray.generate.generator import cut_response


def generate(requests, config: BatchConfig, num_gpus: float, num_cpus: float):
    """The batch job's rows through a ``ray.data.llm`` processor: the same output columns
    as the hf engine, one row per input row, in order."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    processor_config = vLLMEngineProcessorConfig(
        model_source=config.model,
        batch_size=config.batch_size,
        concurrency=config.num_actors,
        # The job tokenizes (to cut long prompts as the hf engine does) and cuts the
        # response by token id; vLLM detokenizes.
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        **vllm_engine.engine_settings(num_gpus, num_cpus, config.batch_size, None),
    )
    processor = build_processor(
        processor_config,
        preprocess=functools.partial(_vllm_request, config=config),
        postprocess=functools.partial(_result, config=config),
    )
    return processor(requests)


@functools.lru_cache(maxsize=2)
def _tokenizer_and_budget(model: str, trust_remote_code: bool, max_new_tokens: int):
    """Loaded once per Ray worker process, which runs many rows."""
    from transformers import AutoConfig

    tokenizer = prompts.load_tokenizer(model, trust_remote_code=trust_remote_code)
    positions = models.context_positions(AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code))
    return tokenizer, prompts.add_special_tokens(tokenizer), models.prompt_budget(positions, max_new_tokens)


def _vllm_request(row: dict, config: BatchConfig) -> dict:
    """One row as vLLM takes it: prompt token ids (cut from the left to fit, as the hf
    engine cuts them) and sampling parameters. A row with an error gets a one-token
    stand-in request, so that it still comes out, with its error, in its place."""
    tokenizer, ids, budget = _tokenizer_and_budget(config.model, config.trust_remote_code, config.max_new_tokens)
    params = config.params()
    sampling = {"max_tokens": params.max_new_tokens, "stop_token_ids": [ids.end], "seed": params.seed}
    if params.greedy:
        sampling["temperature"] = 0.0
    else:
        sampling.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or -1)
    if row["__error"] is not None:
        return {**row, "tokenized_prompt": [ids.response], "truncated": False, "sampling_params": {**sampling, "max_tokens": 1}}
    tokens = tokenizer(prompts.format_prompt(row["__instruction"], row["__input"]))["input_ids"]
    truncated = budget is not None and len(tokens) > budget
    return {**row, "tokenized_prompt": tokens[-budget:] if truncated else tokens, "truncated": truncated, "sampling_params": sampling}


def _result(row: dict, config: BatchConfig) -> dict:
    """The hf engine's output columns, cut from vLLM's token ids by the hf engine's rule."""
    out = dict.fromkeys(RESULT_SCHEMA.names)
    out.update(__record=row["__record"], error=row["__error"])
    if row["__error"] is not None:
        return out
    tokenizer, ids, _ = _tokenizer_and_budget(config.model, config.trust_remote_code, config.max_new_tokens)
    result = cut_response(tokenizer, ids.end, row["generated_tokens"], row["num_input_tokens"], bool(row["truncated"]))
    out.update(response=result.response, finish_reason=result.finish_reason, num_prompt_tokens=result.num_prompt_tokens,
               num_generated_tokens=result.num_generated_tokens, truncated=result.truncated)
    return out
