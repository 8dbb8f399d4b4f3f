"""The Dolly prompt format: the one place it lives.

Training, batch generation and serving all import from here, so a model is always
prompted exactly the way it was trained. No Ray import: usable in a notebook.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dolly_ray import storage

INTRO_BLURB = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
INSTRUCTION_KEY = "### Instruction:"
INPUT_KEY = "Input:"
RESPONSE_KEY = "### Response:"
END_KEY = "### End"

# Added to the tokenizer as special tokens so that each is one id the model learns,
# the loss mask can find, and generation can stop on.
SPECIAL_TOKENS = (END_KEY, INSTRUCTION_KEY, RESPONSE_KEY)

_INPUT_BLOCK = "{input_key}\n{input}\n\n"
_PROMPT = "{intro}\n\n{instruction_key}\n{instruction}\n\n{input_block}{response_key}\n"

# The same prompt as a Jinja chat template, saved with every exported tokenizer so that
# `apply_chat_template`, vLLM and OpenAI-compatible servers prompt the model as it was
# trained: the last user message is the instruction; a system message, or an `input`
# passed to the template, is the Input block. Newlines sit inside string literals, since
# transformers renders with trim_blocks.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(instruction='', input='', response=none) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.input = message['content'] -%}"
    "{%- elif message['role'] == 'user' -%}{%- set ns.instruction = message['content'] -%}{%- set ns.response = none -%}"
    "{%- elif message['role'] == 'assistant' -%}{%- set ns.response = message['content'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if input is defined and input is not none -%}{%- set ns.input = input -%}{%- endif -%}"
    "{{ '" + INTRO_BLURB + "\\n\\n" + INSTRUCTION_KEY + "\\n' + ns.instruction + '\\n\\n' }}"
    "{%- if ns.input | trim -%}{{ '" + INPUT_KEY + "\\n' + ns.input + '\\n\\n' }}{%- endif -%}"
    "{%- if add_generation_prompt -%}{{ '" + RESPONSE_KEY + "\\n' }}"
    "{%- elif ns.response is not none -%}{{ '" + RESPONSE_KEY + "\\n' + ns.response + '\\n\\n" + END_KEY + "' }}"
    "{%- endif -%}"
)

# Used when the special tokens were lost from the output (e.g. decoded with
# skip_special_tokens): still return the text between the keys.
_RESPONSE_BETWEEN_KEYS = re.compile(r"#+\s*Response:\s*(.+?)#+\s*End", re.DOTALL)
_RESPONSE_TO_EOS = re.compile(r"#+\s*Response:\s*(.+)", re.DOTALL)


def format_prompt(instruction: str, input: str | None = None) -> str:
    """The generation prompt: ends right after the response key and its newline."""
    input_block = ""
    if input and input.strip():
        input_block = _INPUT_BLOCK.format(input_key=INPUT_KEY, input=input)
    return _PROMPT.format(
        intro=INTRO_BLURB,
        instruction_key=INSTRUCTION_KEY,
        instruction=instruction,
        input_block=input_block,
        response_key=RESPONSE_KEY,
    )


def format_training_text(instruction: str, response: str, input: str | None = None) -> str:
    """A full training example: the generation prompt, the response, then the end key."""
    return f"{format_prompt(instruction, input)}{response}\n\n{END_KEY}"


def contains_prompt_key(text: str) -> str | None:
    """The first special key found inside free text, or None.

    A record whose own text contains a key would move the loss mask or stop generation
    early, so the data pipeline refuses such records.
    """
    for key in SPECIAL_TOKENS:
        if key in text:
            return key
    return None


def extract_response(text: str) -> str | None:
    """The response inside decoded text that lost its special-token ids, or None."""
    match = _RESPONSE_BETWEEN_KEYS.search(text) or _RESPONSE_TO_EOS.search(text)
    return match.group(1).strip() if match else None


class SpecialTokenError(ValueError):
    """A tokenizer cannot represent a prompt key as a single token."""


@dataclass(frozen=True)
class PromptTokenIds:
    """Ids of the prompt keys in one tokenizer: what the loss mask and the stop rule need."""

    instruction: int
    response: int
    end: int
    pad: int


def add_special_tokens(tokenizer) -> PromptTokenIds:
    """Add the prompt keys to a Hugging Face tokenizer, in place, and return their ids.

    Each key must encode to exactly one id that decodes back to the key, or the loss
    mask and the stop rule would silently break: that raises SpecialTokenError. The pad
    token becomes eos when the tokenizer has none (GPT-J's has none). Calling it twice
    is harmless. The caller resizes the model's embeddings to ``len(tokenizer)``.
    """
    missing = [key for key in SPECIAL_TOKENS if key not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": missing}, replace_extra_special_tokens=False
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise SpecialTokenError(
                f"{type(tokenizer).__name__} has neither a pad nor an eos token; "
                "set tokenizer.pad_token before adding the prompt keys"
            )
        tokenizer.pad_token = tokenizer.eos_token
    ids = {}
    for key in SPECIAL_TOKENS:
        encoded = tokenizer.encode(key, add_special_tokens=False)
        if len(encoded) != 1 or tokenizer.decode(encoded) != key:
            raise SpecialTokenError(
                f"prompt key {key!r} encodes to {len(encoded)} tokens {encoded} with "
                f"{type(tokenizer).__name__}; it must be exactly one token that decodes back to itself"
            )
        ids[key] = encoded[0]
    return PromptTokenIds(
        instruction=ids[INSTRUCTION_KEY],
        response=ids[RESPONSE_KEY],
        end=ids[END_KEY],
        pad=tokenizer.pad_token_id,
    )


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False):
    """A Hugging Face tokenizer (hub id, directory, or a model's URI) with the prompt keys
    added: what every stage tokenizes with.

    Adding the keys is deterministic, so data workers, training workers and generators
    that each load the same base tokenizer agree on every id.
    """
    from transformers import AutoTokenizer

    local = storage.local_model_dir(name_or_path, weights=False)
    tokenizer = AutoTokenizer.from_pretrained(local, trust_remote_code=trust_remote_code)
    add_special_tokens(tokenizer)
    return tokenizer
