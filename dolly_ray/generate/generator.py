"""Batched instruction generation: the one Generator that Serve, the batch job and eval share.

Dolly's ``InstructionTextGenerationPipeline`` generated one prompt at a time; this
class pads many prompts on the left, groups them by length so padding stays small,
stops each sequence at the ``### End`` token and cuts the response out by token id.
No Ray import: usable in a notebook or inside a training worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence, Union

import torch

from dolly_ray import prompts, storage
from dolly_ray.models import context_positions, embedding_rows, prompt_budget

# One request: an instruction, or (instruction, input), or {"instruction": ..., "input": ...}.
Request = Union[str, Sequence[str], Mapping[str, str]]


@dataclass
class GenerationParams:
    """Decoding settings; the defaults are Dolly's (sampling, top_p 0.92, no top-k)."""

    max_new_tokens: int = 256
    greedy: bool = False
    temperature: float = 1.0
    top_p: float = 0.92
    top_k: int = 0  # 0 turns top-k filtering off
    seed: int | None = None  # seeds torch once per generate() call, for reproducible sampling

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.greedy:
            if self.temperature <= 0:
                raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}; use greedy")
            if not 0 < self.top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
            if self.top_k < 0:
                raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def exported_generation_settings(tokenizer, params: GenerationParams = GenerationParams()) -> dict:
    """What an exported model's ``generation_config.json`` holds: stop at ``### End`` (or
    eos), pad with the tokenizer's pad, and sample with ``params`` (Dolly's defaults), so
    a plain ``model.generate(**inputs)`` answers as this project's generator does."""
    end = tokenizer.convert_tokens_to_ids(prompts.END_KEY)
    return {
        "eos_token_id": [end] + ([tokenizer.eos_token_id] if tokenizer.eos_token_id not in (None, end) else []),
        "pad_token_id": tokenizer.pad_token_id,
        "max_new_tokens": params.max_new_tokens,
        "do_sample": not params.greedy,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
    }


@dataclass
class GenerationResult:
    response: str
    finish_reason: str  # "stop": the model generated ### End; "length": it hit max_new_tokens
    num_prompt_tokens: int  # tokens the model actually saw, after any truncation
    num_generated_tokens: int  # including the ### End token when there is one
    truncated: bool  # the prompt was cut from the left to fit the context


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 where the GPU has it, fp16 on other GPUs, fp32 on CPU (half precision is slow there)."""
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _as_request(request: Request) -> tuple[str, str | None]:
    if isinstance(request, str):
        return request, None
    if isinstance(request, Mapping):
        return request["instruction"], request.get("input")
    instruction, input = request
    return instruction, input


def length_sorted_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped longest first into batches of at most ``batch_size`` rows and,
    if given, ``max_batch_tokens`` = rows x the batch's longest length (one row always fits)."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True):
        current = batches[-1] if batches else None
        if current and len(current) < batch_size and (
            max_batch_tokens is None or (len(current) + 1) * lengths[current[0]] <= max_batch_tokens
        ):
            current.append(i)
        else:
            batches.append([i])
    return batches


class InstructionGenerator:
    """Generates Dolly-format responses for batches of instructions with one loaded model."""

    def __init__(self, model, tokenizer):
        """Wrap an already-loaded model and tokenizer (e.g. inside training, for evaluation).

        The prompt keys are added to the tokenizer if missing; each must have a row in the
        model's embeddings, or the model never learnt them.
        """
        self.model, self.tokenizer = model, tokenizer
        self.ids = prompts.add_special_tokens(tokenizer)
        vocab = embedding_rows(model)
        if max(self.ids.instruction, self.ids.response, self.ids.end, self.ids.pad) >= vocab:
            raise ValueError(
                f"the tokenizer's prompt-key ids {self.ids} do not fit the model's {vocab} embeddings; "
                "resize the embeddings to len(tokenizer) and fine-tune before generating"
            )
        self.max_positions = context_positions(model.config)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
    ) -> "InstructionGenerator":
        """Load a checkpoint directory (local or at a URI, see ``storage.local_model_dir``) or hub id.

        Only safetensors weights load unless ``allow_pickle``: a pickled checkpoint can run
        arbitrary code when loaded. (``allow_pickle`` still prefers safetensors when both
        exist: ``use_safetensors=False`` would refuse a safetensors-only checkpoint.)
        """
        from transformers import AutoModelForCausalLM

        device = torch.device(device) if device is not None else default_device()
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        name_or_path = storage.local_model_dir(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            dtype=dtype or default_dtype(device),
            trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True,
        )
        tokenizer = prompts.load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
        return cls(model.to(device).eval(), tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prompt_budget(self, max_new_tokens: int) -> int | None:
        """How many prompt tokens fit beside ``max_new_tokens`` in the context (None: no limit)."""
        return prompt_budget(self.max_positions, max_new_tokens)

    def generate(
        self,
        requests: Sequence[Request],
        params: GenerationParams | None = None,
        *,
        batch_size: int = 8,
        max_batch_tokens: int | None = None,
    ) -> list[GenerationResult]:
        """Generate one result per request, in the order given.

        Prompts run in micro-batches of at most ``batch_size`` similar lengths, longest
        first so an out-of-memory error shows on the first batch rather than the last.
        ``max_batch_tokens`` also caps rows x (longest prompt + max_new_tokens) per batch:
        long prompts then go in smaller batches, since attention and the KV cache grow
        with the padded length of every row.
        """
        params = params or GenerationParams()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        encoded, truncated = self.prepare(requests, params)

        batches = length_sorted_batches([len(ids) + params.max_new_tokens for ids in encoded], batch_size, max_batch_tokens)
        results: list[GenerationResult | None] = [None] * len(encoded)
        was_training = self.model.training
        self.model.eval()
        try:
            for chunk in batches:
                for i, new_ids in zip(chunk, self._generate_batch([encoded[i] for i in chunk], params)):
                    results[i] = self.result(new_ids, len(encoded[i]), truncated[i])
        finally:
            self.model.train(was_training)
        return results  # type: ignore[return-value]

    def prepare(self, requests: Sequence[Request], params: GenerationParams) -> tuple[list[list[int]], list[bool]]:
        """Each prompt's token ids, cut to fit beside ``max_new_tokens``, and whether it was cut."""
        params.validate()
        budget = self.prompt_budget(params.max_new_tokens)
        encoded = self.encode(requests)
        truncated = [budget is not None and len(ids) > budget for ids in encoded]
        # Cut from the left: the end of the prompt holds the response key the model continues from.
        encoded = [ids[-budget:] if cut else ids for ids, cut in zip(encoded, truncated)]
        if params.seed is not None:
            torch.manual_seed(params.seed)
        return encoded, truncated

    def encode(self, requests: Sequence[Request]) -> list[list[int]]:
        """The full prompt token ids of each request, before any truncation."""
        texts = [prompts.format_prompt(*_as_request(r)) for r in requests]
        return self.tokenizer(texts)["input_ids"] if texts else []

    def settled_text(self, new_ids: list[int]) -> str:
        """The start of the response that no later token can change, for streaming: text
        the final clean-up could still change is held back until it settles (surrounding
        whitespace, anything from a ``#``, which may begin an ``### End`` spelled in
        ordinary tokens, and a character whose bytes have not all arrived). The settled
        texts of a growing sequence are prefixes of its final ``result(...).response``."""
        if self.ids.end in new_ids:
            new_ids = new_ids[: new_ids.index(self.ids.end)]
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        for unsettled in ("#", "\ufffd"):
            if unsettled in text:
                text = text[: text.index(unsettled)]
        return text.strip()

    def generation_config(self, params: GenerationParams):
        """A complete GenerationConfig, so nothing leaks in from the checkpoint's defaults."""
        from transformers import GenerationConfig

        sampling = {} if params.greedy else {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k}
        return GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=not params.greedy,
            eos_token_id=self.ids.end,
            pad_token_id=self.ids.pad,
            **sampling,
        )

    @torch.inference_mode()
    def _generate_batch(self, batch: list[list[int]], params: GenerationParams) -> list[list[int]]:
        """The new token ids for each prompt of one micro-batch, left-padded to one length."""
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self.ids.pad, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        output = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            generation_config=self.generation_config(params),
        )
        return output[:, width:].tolist()

    def result(self, new_ids: list[int], num_prompt_tokens: int, truncated: bool) -> GenerationResult:
        """Cut the response out of one sequence's new tokens (see ``cut_response``)."""
        return cut_response(self.tokenizer, self.ids.end, new_ids, num_prompt_tokens, truncated)


def cut_response(tokenizer, end_id: int, new_ids: Sequence[int], num_prompt_tokens: int, truncated: bool) -> GenerationResult:
    """The response in one sequence's new tokens, whichever engine generated them.

    The prompt ends with the response key, so the response starts at the first new
    token and ends before the ``### End`` id; what follows it is padding. Without
    the id, the text is still cut at an ``### End`` spelled out in ordinary tokens.
    """
    new_ids = list(new_ids)
    if end_id in new_ids:
        cut = new_ids.index(end_id)
        text = tokenizer.decode(new_ids[:cut], skip_special_tokens=True)
        return GenerationResult(text.strip(), "stop", num_prompt_tokens, cut + 1, truncated)
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    response = prompts.extract_response(f"{prompts.RESPONSE_KEY}\n{text}") or ""
    return GenerationResult(response, "length", num_prompt_tokens, len(new_ids), truncated)
