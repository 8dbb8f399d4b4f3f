"""Checks on a model that every job makes on its driver before it reserves anything, and
the model arithmetic (context length, embedding rows, prompt room) training and
generation share. No Ray import."""

from __future__ import annotations

import glob
import logging
import os

from dolly_ray import prompts, storage

logger = logging.getLogger(__name__)


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
    model's config (read without its weights).

    ``max_new_tokens`` marks a job that generates (Serve, batch generation, evaluation):
    its model must also have embedding rows for the prompt keys, which training adds."""
    from transformers import AutoConfig, AutoTokenizer

    if storage.is_local_path(name_or_path) and not os.path.isdir(name_or_path):
        raise ValueError(f"model directory not found: {name_or_path}")
    check_weights(name_or_path, allow_pickle=allow_pickle, need_weights=need_weights)
    try:
        local = storage.local_model_dir(name_or_path, weights=False)
        model_config = AutoConfig.from_pretrained(local, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(local, trust_remote_code=trust_remote_code)
        trained_keys = prompts.END_KEY in tokenizer.get_vocab()
        ids = prompts.add_special_tokens(tokenizer)  # as prompts.load_tokenizer adds them
    except prompts.SpecialTokenError:
        raise
    except Exception as e:  # not found, offline, no config.json, remote code refused
        hint = "; pass --trust-remote-code only if you trust that code" if "trust_remote_code" in str(e) else ""
        raise ValueError(f"cannot load model {name_or_path!r}: {type(e).__name__}: {str(e).splitlines()[0]}{hint}") from None
    if max_new_tokens is not None:
        prompt_budget(context_positions(model_config), max_new_tokens)
        _check_prompt_key_rows(name_or_path, ids, trained_keys, model_config)
    return model_config


def _check_prompt_key_rows(name_or_path: str, ids: prompts.PromptTokenIds, trained_keys: bool, model_config) -> None:
    """A model that never met Dolly's prompt keys: refused when their ids lie beyond its
    embedding rows (it cannot run), warned about when they fit its spare rows (it runs,
    but its answers will not stop at ``### End``)."""
    rows = model_config.get_text_config().vocab_size
    largest = max(ids.instruction, ids.response, ids.end, ids.pad)
    if largest >= rows:
        raise ValueError(
            f"model {name_or_path!r} has {rows} embedding rows but needs row {largest} for Dolly's prompt keys: it was not "
            "trained by dolly_ray; pass a training run's hf/ folder, or train this model first (jobs/train.py)"
        )
    if not trained_keys:
        logger.warning("model %s was not trained with Dolly's prompt keys: its answers will not stop at %s", name_or_path, prompts.END_KEY)
