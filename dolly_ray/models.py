"""Checks on a model that every job makes on its driver before it reserves anything, and
the model arithmetic (context length, embedding rows, prompt room) training and
generation share. No Ray import."""

from __future__ import annotations

import glob
import os

from dolly_ray import prompts, storage


def check_weights(name_or_path: str, *, allow_pickle: bool = False, need_weights: bool = True) -> None:
    """Refuse a local model directory whose only weights are pickles, unless ``allow_pickle``,
    and one with no weights at all when they are needed (a plan needs only the config).

    Loading a pickle can run code. ``from_pretrained(use_safetensors=True)`` refuses such
    a directory too, but only once a worker loads it; jobs call this on their driver.
    """
    if not os.path.isdir(name_or_path) or glob.glob(os.path.join(name_or_path, "*.safetensors")):
        return
    if any(glob.glob(os.path.join(name_or_path, "*" + suffix)) for suffix in storage.WEIGHT_SUFFIXES):
        if allow_pickle:
            return
        raise ValueError(
            f"{name_or_path} has no safetensors weights; pickle weights can run code when loaded. "
            "Convert them to safetensors, or pass --allow-pickle if you trust the files"
        )
    if need_weights:
        raise ValueError(f"{name_or_path} holds no model weights (no *.safetensors files)")


def context_positions(model_config) -> int | None:
    """The model's context length in tokens, under whichever name its config uses (None: unknown)."""
    return getattr(model_config, "n_positions", None) or getattr(model_config, "max_position_embeddings", None)


def embedding_rows(model) -> int:
    """Rows of the model's input embedding, read without touching its weight: under ZeRO-3
    a partitioned weight is empty outside a gather, and peft's trainable-token wrapper
    builds a merged copy of it on each access."""
    embedding = model.get_input_embeddings()
    return getattr(embedding, "original_module", embedding).num_embeddings


def prompt_budget(positions: int | None, max_new_tokens: int) -> int | None:
    """How many prompt tokens fit beside ``max_new_tokens`` in ``positions`` (None: no limit)."""
    if positions is None:
        return None
    budget = positions - max_new_tokens
    if budget < 2:  # at least the response key and its newline
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's {positions} positions")
    return budget


def check_loadable_model(
    name_or_path: str, *, trust_remote_code: bool = False, allow_pickle: bool = False, max_new_tokens: int | None = None, need_weights: bool = True
):
    """Refuse on a job's driver what every worker would refuse later: a model that is not
    there or will not load, custom code without ``trust_remote_code``, pickle-only weights
    without ``allow_pickle``, a tokenizer that cannot hold the prompt keys, or no room for
    a prompt beside ``max_new_tokens``. Raises ValueError naming the problem; returns the
    model's config (read without its weights)."""
    from transformers import AutoConfig

    if storage.is_local_path(name_or_path) and not os.path.isdir(name_or_path):
        raise ValueError(f"model directory not found: {name_or_path}")
    check_weights(name_or_path, allow_pickle=allow_pickle, need_weights=need_weights)
    try:
        local = storage.local_model_dir(name_or_path, weights=False)
        model_config = AutoConfig.from_pretrained(local, trust_remote_code=trust_remote_code)
        prompts.load_tokenizer(local, trust_remote_code=trust_remote_code)
    except prompts.SpecialTokenError:
        raise
    except Exception as e:  # not found, offline, no config.json, remote code refused
        hint = "; pass --trust-remote-code only if you trust that code" if "trust_remote_code" in str(e) else ""
        raise ValueError(f"cannot load model {name_or_path!r}: {type(e).__name__}: {str(e).splitlines()[0]}{hint}") from None
    if max_new_tokens is not None:
        prompt_budget(context_positions(model_config), max_new_tokens)
    return model_config
