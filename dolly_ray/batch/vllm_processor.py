"""The vllm engine in the batch job: a ``ray.data.llm`` processor on the exported
checkpoint with the hf engine's output columns, one row per input row (a bad row keeps
its ``error``, a row vLLM fails on gets one), the same prompt truncation and response cut."""

from __future__ import annotations

import functools

import pyarrow as pa

from dolly_ray import models, prompts
from dolly_ray.batch.config import GENERATION_FAILED, RESULT_SCHEMA, BatchConfig
from dolly_ray.generate import vllm_engine
from dolly_ray.generate.generator import cut_response


def generate(requests, config: BatchConfig, num_gpus: float, num_cpus: float):
    """The batch job's rows through a ``ray.data.llm`` processor: the same output columns
    as the hf engine, one row per input row, in order. A row whose generation raises
    gets an error instead of failing the job (``should_continue_on_error``)."""
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
        should_continue_on_error=True,
        **vllm_engine.engine_settings(num_gpus, num_cpus, config.batch_size, None),
    )
    processor = build_processor(
        processor_config,
        preprocess=functools.partial(_vllm_request, config=config),
        postprocess=functools.partial(_result, config=config),
    )
    return processor(requests).map_batches(with_inference_errors, batch_format="pyarrow")


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
    out.update(__record=row["__record"], __source=row["__source"], __row=row["__row"], error=row["__error"])
    if row["__error"] is not None:
        return out
    tokenizer, ids, _ = _tokenizer_and_budget(config.model, config.trust_remote_code, config.max_new_tokens)
    result = cut_response(tokenizer, ids.end, row["generated_tokens"], row["num_input_tokens"], bool(row["truncated"]))
    out.update(response=result.response, finish_reason=result.finish_reason, num_prompt_tokens=result.num_prompt_tokens,
               num_generated_tokens=result.num_generated_tokens, truncated=result.truncated)
    return out


def with_inference_errors(batch: pa.Table) -> pa.Table:
    """The processor's rows as the job's: a row vLLM failed on skips ``_result`` and comes
    back as the engine saw it, ``__inference_error__`` set and no result columns; it gets
    that failure as its ``error`` (unless it already had one), and no response."""

    def column(name: str) -> list:  # a block of failed rows alone lacks the result columns
        return batch[name].to_pylist() if name in batch.column_names else [None] * batch.num_rows

    columns = {name: column(name) for name in ("__record", "__source", "__row", *RESULT_SCHEMA.names)}
    for i, (failure, error) in enumerate(zip(batch["__inference_error__"].to_pylist(), column("__error"))):
        if failure:
            for name in RESULT_SCHEMA.names:
                columns[name][i] = None
            columns["error"][i] = error or f"{GENERATION_FAILED}: {failure}"
    types = {"__record": pa.string(), "__source": pa.string(), "__row": pa.int64(), **{f.name: f.type for f in RESULT_SCHEMA}}
    return pa.table({name: pa.array(values, types[name]) for name, values in columns.items()})
