"""LoRA with peft on the ZeRO-3 model: low-rank adapters on the linear layers of attention
and MLP, and the rows of the prompt keys in the input and output embeddings, are all
that train; every other weight stays frozen as loaded.

The new tokens' rows train through peft's ``trainable_token_indices``: only those rows are
parameters (a delta of a few rows per matrix), so the optimizer state stays LoRA-sized;
``modules_to_save`` would copy and train both whole vocabulary matrices (for GPT-J-6B,
two of 206M parameters with their Adam state). Two things in peft 0.21 need help here:
building the delta under ZeRO-3 takes a CUDA-only path (the weights are gathered here
instead), and the delta's output layer drops the layer's bias (GPT-J's ``lm_head`` has
one: a forward hook adds it back; peft issue 3649).

A checkpoint holds the DeepSpeed state of the trainable parameters only; the export
writes the adapter (``adapter/``, for peft) and the merged model (``hf/``, plain
transformers), merged from the 16-bit weights gathered from every rank.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch

from dolly_ray import prompts

ALL_LINEAR = "all-linear"  # peft's name for every linear layer but the output layer
PEFT_PREFIX = "base_model.model."
ADAPTER = "default"  # peft's adapter name


def target_modules(spec: str) -> str | list[str]:
    """``all-linear`` or a comma-separated list of module names (peft matches name suffixes)."""
    return ALL_LINEAR if spec == ALL_LINEAR else [name.strip() for name in spec.split(",") if name.strip()]


def lora_config(model, token_ids: list[int], *, r: int, alpha: float, dropout: float, targets: str):
    """peft's LoraConfig for ``model``: ``targets`` adapted, ``token_ids`` rows trained in
    the input embedding and, unless tied to it, the output layer."""
    from peft import LoraConfig

    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(module): name for name, module in model.named_modules()}
    tied = embedding.weight is head.weight
    rows = token_ids if tied else {names[id(embedding)]: token_ids, names[id(head)]: token_ids}
    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules(targets), task_type="CAUSAL_LM", trainable_token_indices=rows
    )


def add_adapters(model, tokenizer, *, r: int, alpha: float, dropout: float, targets: str):
    """The peft model over ``model`` (partitioned by ZeRO-3 or not): only the adapters and
    the prompt keys' rows require gradients."""
    import peft.tuners.trainable_tokens.layer as trainable_tokens
    from peft import get_peft_model

    token_ids = tokenizer.convert_tokens_to_ids(list(prompts.SPECIAL_TOKENS))
    config = lora_config(model, token_ids, r=r, alpha=alpha, dropout=dropout, targets=targets)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    # peft reads the rows to train from the weights; under ZeRO-3 it would gather them on a
    # CUDA device, so they are gathered here (on any device) and its own path is skipped.
    with _gathered([embedding.weight, head.weight]), mock.patch.object(trainable_tokens, "check_deepspeed_zero3_enabled", return_value=False):
        model = get_peft_model(model, config, autocast_adapter_dtype=False)
    _keep_head_bias(model)
    return model


def load_with_adapter(base_model: str, adapter_dir: str, **from_pretrained_kwargs):
    """The base model with its embeddings resized to the adapter's tokenizer and the
    adapter on top, as training ran it (``from_pretrained_kwargs`` go to the base's
    ``from_pretrained``). The merged export (``hf/``) answers the same."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model, **from_pretrained_kwargs)
    tokenizer = prompts.load_tokenizer(adapter_dir)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model = PeftModel.from_pretrained(model, adapter_dir)
    _keep_head_bias(model)
    return model


def _keep_head_bias(model) -> None:
    head_adapter = getattr(model.get_output_embeddings(), "token_adapter", None)
    if head_adapter is not None and head_adapter.tied_adapter is None and head_adapter.base_layer.bias is not None:
        head_adapter.register_forward_hook(_add_head_bias)


def _add_head_bias(layer, inputs, output):
    """peft's trainable-token layer computes a Linear without its bias (peft issue 3649)."""
    if layer.merged or layer.disable_adapters or not layer.active_adapters:
        return output  # the base layer ran, with its bias
    return output + layer.base_layer.bias


def _gathered(parameters):
    """The ZeRO-3 partitioned ``parameters`` whole for the block; nothing without ZeRO-3."""
    if not any(hasattr(p, "ds_id") for p in parameters):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(parameters, modifier_rank=None)


def count_trainable(model, *, r: int, alpha: float, dropout: float, targets: str) -> int:
    """Parameters LoRA trains on ``model`` (built on the meta device: no memory), for the
    memory plan. Target modules the model does not have are a ConfigError."""
    from peft import get_peft_model

    from dolly_ray.cli import ConfigError

    token_ids = list(range(len(prompts.SPECIAL_TOKENS)))  # the count depends only on how many rows
    try:
        wrapped = get_peft_model(model, lora_config(model, token_ids, r=r, alpha=alpha, dropout=dropout, targets=targets))
    except ValueError as e:
        raise ConfigError(f"--lora-target-modules {targets!r}: {' '.join(str(e).split())}") from None
    return sum(p.numel() for p in trainable_parameters(wrapped))


def is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The trainable tensors whole, gathered from every rank (every rank must call it)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    with _gathered([p for _, p in named]):
        return {name: p.detach().cpu().clone() for name, p in named}


def merged_state_dict(state_dict: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """The base model's state dict with the adapters merged in: each adapted weight
    ``W + scaling * B @ A`` (computed in fp32), each embedding with its trained rows.
    ``state_dict`` is the peft model's, whole (``engine._zero3_consolidated_16bit_state_dict``)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    merged = dict(state_dict)
    for name, module in model.named_modules():
        prefix = name + "."
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            weight = merged.pop(prefix + "base_layer.weight")
            a, b = merged.pop(f"{prefix}lora_A.{ADAPTER}.weight").float(), merged.pop(f"{prefix}lora_B.{ADAPTER}.weight").float()
            delta = module.scaling[ADAPTER] * (b @ a)
            merged[prefix + "weight"] = (weight.float() + (delta.T if module.fan_in_fan_out else delta)).to(weight.dtype)
        elif isinstance(module, TrainableTokensLayer) and module.tied_adapter is not None:
            for key in (prefix + "base_layer.weight", f"{prefix}trainable_tokens_delta.{ADAPTER}"):
                merged.pop(key, None)  # an output layer tied to the embedding: saved with it
            continue
        elif isinstance(module, TrainableTokensLayer):
            weight = merged.pop(prefix + "base_layer.weight")
            rows = merged.pop(f"{prefix}trainable_tokens_delta.{ADAPTER}")
            indices = torch.tensor(module.token_indices[ADAPTER], device=weight.device)
            merged[prefix + "weight"] = weight.index_copy(0, indices, rows.to(weight.dtype))
        else:
            continue
        if prefix + "base_layer.bias" in merged:
            merged[prefix + "bias"] = merged.pop(prefix + "base_layer.bias")
    return {key.removeprefix(PEFT_PREFIX).replace(".token_adapter.", "."): value for key, value in merged.items()}
