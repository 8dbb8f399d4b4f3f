"""The DeepSpeed ZeRO-3 engine one training process steps: the model partitioned across
ranks as it loads, with embeddings for the prompt keys, and the preset it runs under.

No Ray import: the training workers and the throughput benchmarks build it the same way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dolly_ray import prompts, storage
from dolly_ray.train import batching, deepspeed_config, lora
from dolly_ray.train.config import StepPlan, TrainConfig


def build_engine(config: TrainConfig, plan: StepPlan, world_size: int, *, model_config=None):
    """``(engine, tokenizer, preset)`` for one worker: a DeepSpeed ZeRO-3 engine over the
    model, partitioned across ranks as it loads, and the tokenizer with the prompt keys.

    ``model_config`` builds a randomly initialised model of that shape instead of
    loading ``config.model`` (which then only supplies the tokenizer): benchmarks train
    GPT-J-6B's shape this way without its weights.
    """
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    torch.manual_seed(config.seed)
    # Ray Train has set up torch.distributed; DeepSpeed's comm layer adopts it.
    deepspeed.init_distributed(dist_backend="nccl" if config.use_gpu else "gloo")
    rank = dist.get_rank()
    preset = deepspeed_config.agreed_gpu_preset(world_size, rank) if config.preset == deepspeed_config.AUTO else config.preset
    ds_config = deepspeed_config.build(
        preset,
        world_size=world_size,
        micro_batch_size=config.micro_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps,
        total_steps=plan.total_steps,
        overrides=config.deepspeed,
    )
    tokenizer = prompts.load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    # Must exist before the model is built (it turns on zero.Init), and live as long as
    # the engine: transformers keeps only a weak reference to it.
    hf_deepspeed_config = HfDeepSpeedConfig(ds_config)
    model = load_model(config, ds_config, tokenizer, model_config)
    if config.batching == "pack":
        batching.check_packing_attention(model.config)
    trained = lora.trainable_parameters(model)  # with LoRA, the adapters and the prompt keys' rows
    optimizer = None
    if deepspeed_config.uses_client_optimizer(preset):
        optimizer = torch.optim.AdamW(trained, lr=config.learning_rate, weight_decay=config.weight_decay)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=None if optimizer else trained, config=ds_config)
    engine.hf_deepspeed_config = hf_deepspeed_config
    return engine, tokenizer, preset


def load_model(config: TrainConfig, ds_config: dict, tokenizer, model_config=None):
    """The model (from ``config.model``, or random from ``model_config``) with embeddings
    for the prompt keys, built under zero.Init so no worker ever holds it whole; with
    ``lora_r``, wrapped in peft's LoRA model (see ``lora``)."""
    from transformers import AutoModelForCausalLM

    dtype = deepspeed_config.model_dtype(ds_config)
    if model_config is not None:
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            storage.local_model_dir(config.model), dtype=dtype, use_safetensors=None if config.allow_pickle else True, trust_remote_code=config.trust_remote_code
        )
    # num_embeddings is the module's own count, valid while the weight is partitioned.
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    lora_settings = config.lora_settings()
    if lora_settings:
        model = lora.add_adapters(model, tokenizer, **lora_settings)
    return model
