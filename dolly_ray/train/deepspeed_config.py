"""DeepSpeed ZeRO-3 presets as data, which one a run gets, and the one function that completes them.

A preset says what a kind of GPU can do (precision, what to offload); the training
run adds what only it knows (batch sizes, world size, learning-rate schedule), so the
finished config has nothing left as "auto": there is no Hugging Face Trainer here to
fill it in.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

_ZERO3 = {
    "stage": 3,
    "overlap_comm": True,
    "contiguous_gradients": True,
    "reduce_bucket_size": 5e7,
    "stage3_prefetch_bucket_size": 5e7,
    "stage3_param_persistence_threshold": 1e5,
    "stage3_max_live_parameters": 1e9,
    "stage3_max_reuse_distance": 1e9,
    # Lets the final save gather a 16-bit model for Hugging Face.
    "stage3_gather_16bit_weights_on_model_save": True,
}
_OFFLOAD_OPTIMIZER = {"offload_optimizer": {"device": "cpu", "pin_memory": True}}

PRESETS: dict[str, dict[str, Any]] = {
    # 8x A100 40/80 GB: everything on the GPUs.
    "a100": {"bf16": {"enabled": True}, "zero_optimization": _ZERO3},
    # A10/A10G 24 GB: bf16 works, but Adam state for 6B parameters does not fit.
    "a10": {"bf16": {"enabled": True}, "zero_optimization": {**_ZERO3, **_OFFLOAD_OPTIMIZER}},
    # V100: no bf16, so fp16 with dynamic loss scaling, and the optimizer on the CPU.
    "v100": {
        "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "zero_optimization": {**_ZERO3, **_OFFLOAD_OPTIMIZER},
    },
    # Tests and the demo: fp32 ZeRO-3 over gloo, with torch's AdamW (DeepSpeed's own
    # Adam kernels need CUDA or a compiled CPU op).
    "cpu": {"zero_optimization": {**_ZERO3, "overlap_comm": False}, "client_optimizer": True},
}

GPU_PRESETS = ("a100", "a10", "v100")
# Chosen at run time: ``cpu`` on a cluster without GPUs, else each worker's GPU decides
# (``preset_for_gpu``).
AUTO = "auto"
# Below this much memory per GPU (A10/A10G: 24 GB), a 6B model's Adam state must be
# offloaded to the CPU; A100 40 GB (which reports about 39.4 GiB) keeps it on the GPU.
_FULL_ON_GPU_GIB = 32

logger = logging.getLogger(__name__)


def check_preset(preset: str, use_gpu: bool | None, accelerator_type: str) -> bool | None:
    """Refuse an unknown preset and flags that contradict it; return ``use_gpu`` as the
    preset settles it (``auto`` leaves an unset one open until the cluster is known).

    ``a10`` or ``v100`` with ``use_gpu=False`` is a rehearsal on CPUs: the same precision,
    offload and loss scaling, run by DeepSpeed's CPU accelerator.
    """
    if preset != AUTO and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)} or auto")
    if preset == "cpu" and use_gpu:
        raise ValueError("preset 'cpu' is for CPU-only runs; use_gpu=True contradicts it")
    if preset == "a100" and use_gpu is False:
        raise ValueError("preset 'a100' keeps Adam on the GPU and cannot run on CPUs; rehearse with preset a10 or v100, or train with preset cpu")
    if preset != AUTO and use_gpu is None:
        use_gpu = preset in GPU_PRESETS
    if accelerator_type and use_gpu is False:
        raise ValueError(f"accelerator_type {accelerator_type!r} selects GPUs; use_gpu=False (or preset cpu) contradicts it")
    return use_gpu


def preset_for_gpu(compute_capability: tuple[int, int], memory_gib: float) -> str:
    """The preset that fits one GPU: bf16 needs compute capability 8.0 (Ampere) or later,
    and the optimizer state stays on the GPU only with 32 GiB or more.

    A100/H100 -> a100; A10/A10G/L4/L40 -> a10; V100/T4 -> v100.
    """
    if tuple(compute_capability) < (8, 0):
        return "v100"
    return "a100" if memory_gib >= _FULL_ON_GPU_GIB else "a10"


def agreed_gpu_preset(world_size: int, rank: int) -> str:
    """``auto`` on a training worker: the preset for this worker's GPU, which every worker
    must share (a collective: every rank calls it)."""
    import torch
    import torch.distributed as dist

    device = torch.cuda.get_device_properties(torch.cuda.current_device())
    mine = (preset_for_gpu((device.major, device.minor), device.total_memory / 2**30), device.name)
    everyone: list = [None] * world_size
    dist.all_gather_object(everyone, mine)
    if len({preset for preset, _ in everyone}) > 1:
        raise RuntimeError(
            f"preset auto: the workers have GPUs that need different presets {sorted(set(everyone))}; "
            "pass --preset, or --accelerator-type to train on one kind of GPU"
        )
    if rank == 0:
        logger.info("preset auto: chose %s for %s (%.0f GiB)", mine[0], device.name, device.total_memory / 2**30)
    return mine[0]


def merge(base: dict, overrides: dict) -> dict:
    """Recursively merge ``overrides`` over ``base`` (a new dict; neither is changed)."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def model_dtype(config: dict):
    """The torch dtype to build the model in, so its weights match the config's precision."""
    import torch

    if config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    return torch.float16 if config.get("fp16", {}).get("enabled") else torch.float32


def uses_client_optimizer(preset: str) -> bool:
    """Whether the training loop must build a torch optimizer instead of DeepSpeed's."""
    return bool(PRESETS[preset].get("client_optimizer"))


def build(
    preset: str,
    *,
    world_size: int,
    micro_batch_size: int,
    gradient_accumulation_steps: int,
    learning_rate: float,
    weight_decay: float,
    warmup_steps: int,
    total_steps: int,
    overrides: dict | None = None,
) -> dict[str, Any]:
    """The complete DeepSpeed config for one run: preset, then run values, then user overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    config = {k: v for k, v in PRESETS[preset].items() if k != "client_optimizer"}
    config.update(
        {
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": gradient_accumulation_steps,
            "gradient_clipping": 1.0,
            "steps_per_print": 10**9,  # progress goes through ray.train.report instead
            "wall_clock_breakdown": False,
            "scheduler": {
                "type": "WarmupDecayLR",
                "params": {
                    "warmup_min_lr": 0.0,
                    "warmup_max_lr": learning_rate,
                    "warmup_num_steps": warmup_steps,
                    "total_num_steps": max(total_steps, warmup_steps + 1),
                    "warmup_type": "linear",
                },
            },
        }
    )
    if not uses_client_optimizer(preset):
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": learning_rate, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": weight_decay},
        }
    config = merge(config, overrides or {})
    batch = config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"] * world_size
    if config.setdefault("train_batch_size", batch) != batch:
        raise ValueError(
            f"train_batch_size {config['train_batch_size']} != micro batch "
            f"{config['train_micro_batch_size_per_gpu']} x accumulation {config['gradient_accumulation_steps']} x {world_size} workers"
        )
    return config
