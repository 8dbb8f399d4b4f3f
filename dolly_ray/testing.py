"""Tiny local stand-ins for GPT-J and its tokenizer, for tests, benchmarks and the demo.

Both are written with ``save_pretrained`` so every code path loads them with
``from_pretrained(path)`` exactly as it would load ``EleutherAI/gpt-j-6B``; nothing
here touches the network.
"""

from __future__ import annotations

import collections
from pathlib import Path

from dolly_ray import prompts, tasks

EOS_TOKEN = "<|endoftext|>"


def build_tokenizer(path: str | Path, vocab_size: int = 400, corpus: list[str] | None = None):
    """Train a byte-level BPE tokenizer on the prompt template and task phrasings.

    Like GPT-J's, it has an eos token, no pad token and none of the prompt keys: the
    project adds those itself. Merges come from the fixed wording, so the random words
    inside tasks stay close to one token per letter, which a tiny model can learn from.
    An extra ``corpus`` (real English, say) gives GPT-J-like compression instead.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    wording = [text.format_map(collections.defaultdict(str)) for text in tasks.WORDING.values()]
    corpus = list(corpus or []) + ([prompts.INTRO_BLURB, prompts.INPUT_KEY] + wording) * 20
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        model_max_length=2048,
    )
    tokenizer.save_pretrained(str(path))
    return tokenizer


def english_corpus(records: list[dict]) -> list[str]:
    """The text of instruction records (instruction, input if any, output): trained on
    it, ``build_tokenizer`` spends about as many tokens on English as GPT-J's does."""
    return ["\n".join(r[key] for key in ("instruction", "input", "output") if r.get(key)) for r in records]


def build_model(
    path: str | Path,
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    head_dim: int = 32,
    n_positions: int = 2048,
    vocab_size: int = 512,
    seed: int = 0,
    tokenizer_corpus: list[str] | None = None,
    tokenizer_vocab_size: int = 400,
) -> Path:
    """Write a randomly initialised GPT-J and a tiny tokenizer to ``path`` (safetensors).

    ``tokenizer_corpus`` and ``tokenizer_vocab_size`` go to ``build_tokenizer``. Like
    GPT-J's, the embeddings have spare rows for the prompt keys the project adds.
    """
    import torch
    from transformers import GPTJConfig, GPTJForCausalLM

    path = Path(path)
    tokenizer = build_tokenizer(path, vocab_size=tokenizer_vocab_size, corpus=tokenizer_corpus)
    config = GPTJConfig(
        vocab_size=max(vocab_size, len(tokenizer) + len(prompts.SPECIAL_TOKENS)),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_embd // head_dim,
        rotary_dim=min(16, head_dim),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    GPTJForCausalLM(config).save_pretrained(str(path), safe_serialization=True)
    return path


def cpu_train_config(model: str | Path, dataset: str | Path, storage_path: str | Path, name: str, **overrides):
    """A TrainConfig for a tiny ZeRO-3 run on 2 local CPU workers.

    Each worker takes half a CPU so Ray Data keeps one on a 2-core machine; records are
    short, 10% are held out, and eval runs only at the end unless overridden.
    """
    from dolly_ray import train

    settings = dict(
        max_length=128, eval_fraction=0.1, eval_every=0, num_workers=2, cpus_per_worker=0.5, preset="cpu"
    )
    return train.TrainConfig(
        model=str(model), dataset=str(dataset), storage_path=str(storage_path), name=name, **{**settings, **overrides}
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
