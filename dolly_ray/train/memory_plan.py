"""The memory and time plan of a training run: arithmetic on the model's config, before anything starts.

Per GPU under ZeRO-3 over ``workers`` GPUs (P parameters, Lp in the largest module):

- parameters: this GPU's partition, 2 bytes each (16-bit presets) or 4 (``cpu``);
- gathered parameters: what ZeRO-3 holds whole for compute and prefetch, up to
  ``stage3_max_live_parameters``;
- gradients: the 16-bit partition (on the CPU when the optimizer is offloaded);
- optimizer state: fp32 master weights, fp32 gradients and Adam's two moments,
  16 bytes per parameter of the partition, on the GPU or (offload) in CPU RAM;
- activations: what backward needs per token and layer, all of it or, with gradient
  checkpointing, each layer's input plus one layer recomputed;
- logits: the output layer's scores for every token, in 16-bit, fp32 and log-softmax;
- buffers: ZeRO-3's reduce and prefetch buckets.

``model_states`` repeats the first four in the terms DeepSpeed's own estimator
(``estimate_zero3_model_states_mem_needs``) uses, which a test compares. The per-token
activation constants were measured on GPT-J's blocks (transformers' SDPA and eager
attention); other families are estimated with the same constants from their widths.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dolly_ray.train import deepspeed_config

GIB = 2**30
# Room left on each GPU for the CUDA context and the allocator's fragmentation.
GPU_HEADROOM = 0.9
# Micro-batch sizes a plan chooses among, largest first.
MICRO_BATCH_CHOICES = (8, 4, 2, 1)
MFU = 0.3


@dataclass(frozen=True)
class Gpu:
    memory_gib: float  # what torch reports as the device's total memory
    peak_tflops: float  # dense 16-bit tensor throughput (datasheet)
    compute_capability: tuple[int, int]


# By Ray's accelerator type names; --gpu-memory-gib settles the 16/32 GB V100 and 40/80 GB A100.
GPUS = {
    "A10G": Gpu(22.0, 70, (8, 6)),
    "A10": Gpu(22.0, 125, (8, 6)),
    "L4": Gpu(22.0, 121, (8, 9)),
    "T4": Gpu(14.6, 65, (7, 5)),
    "V100": Gpu(15.8, 125, (7, 0)),
    "A100": Gpu(39.4, 312, (8, 0)),
    "A100-40G": Gpu(39.4, 312, (8, 0)),
    "A100-80G": Gpu(79.3, 312, (8, 0)),
    "L40S": Gpu(44.4, 362, (8, 9)),
    "H100": Gpu(79.1, 989, (9, 0)),
    "H200": Gpu(139.8, 989, (9, 0)),
}
# The GPU each preset was made for, planned against when no GPU type is known.
REFERENCE_GPU = {"a10": "A10G", "v100": "V100", "a100": "A100"}


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know of a model, read from its config without its weights."""

    parameters: int
    largest_module_parameters: int
    embedding_parameters: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    attention: str  # transformers' attention implementation: sdpa, eager, ...
    trainable_parameters: int  # all of them, or with LoRA the adapters and the prompt keys' rows

    @classmethod
    def from_config(cls, model_config, *, trust_remote_code: bool = False, lora_settings: dict | None = None) -> "ModelShape":
        """Builds the model on the meta device: exact counts, tied weights counted once, no
        memory. ``lora_settings`` (``lora.count_trainable``'s arguments): what LoRA trains."""
        import torch
        from transformers import AutoModelForCausalLM

        from dolly_ray.train import lora

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
        text = model.config.get_text_config()
        hidden = text.hidden_size
        parameters = sum(p.numel() for p in model.parameters())
        largest_module = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        attention = model.config._attn_implementation or "eager"
        embedding = model.get_input_embeddings().weight.numel()
        trainable = lora.count_trainable(model, **lora_settings) if lora_settings else parameters  # (wraps the model)
        return cls(
            parameters=parameters,
            largest_module_parameters=largest_module,
            embedding_parameters=embedding,
            hidden=hidden,
            intermediate=getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden,
            layers=text.num_hidden_layers,
            heads=text.num_attention_heads,
            vocab=text.vocab_size,
            attention=attention,
            trainable_parameters=trainable,
        )

    def activation_bytes_per_token(self, max_length: int, dtype_bytes: int) -> float:
        """Saved activations of one layer per token: attention's inputs and outputs, the MLP's
        intermediate tensors, and with eager attention the softmax over ``max_length`` keys."""
        per_token = (12 * self.hidden + 10 * self.intermediate) * dtype_bytes / 2
        if self.attention == "eager":
            per_token += 6 * self.heads * max_length * dtype_bytes / 2
        return per_token


@dataclass
class MemoryPlan:
    """One run's plan: the choices it was made for, and what they need."""

    preset: str
    gpu: str  # accelerator type, "" when the workers run on CPUs
    gpu_memory_gib: float
    workers: int
    gpus_per_node: int
    micro_batch_size: int
    max_length: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    parameters: int
    trainable_parameters: int  # what gradients and optimizer state are kept for
    per_gpu_gib: dict[str, float]
    activations_gib: dict[str, float]  # without and with gradient checkpointing
    cpu_per_node_gib: dict[str, float]
    model_states_gib: dict[str, float]  # as DeepSpeed's estimator counts them (buffer factor 1)
    tokens_per_micro_batch: int
    tokens_per_step: int
    fits: bool
    time: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_epoch_tokens(self, epoch_tokens: int) -> "MemoryPlan":
        """This plan with the time of an epoch of ``epoch_tokens`` training tokens."""
        time = dict(self.time, epoch_tokens=epoch_tokens)
        if time["tokens_per_s"]:
            time["epoch_hours"] = round(epoch_tokens / time["tokens_per_s"] / 3600, 2)
        return dataclasses.replace(self, time=time)

    def summary(self) -> str:
        """One line for an error message or a log."""
        where = f"{self.workers}x {self.gpu} ({self.gpu_memory_gib:g} GiB)" if self.gpu else f"{self.workers} CPU workers on a node"
        parts = ", ".join(f"{k} {v:.1f}" for k, v in self.per_gpu_gib.items() if k != "total")
        return (
            f"preset {self.preset} on {where}, micro-batch {self.micro_batch_size} x {self.max_length} tokens, "
            f"gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}: "
            f"{self.per_gpu_gib['total']:.1f} GiB per {'GPU' if self.gpu else 'worker'} ({parts}); "
            f"CPU RAM per node {self.cpu_per_node_gib['total']:.1f} GiB"
        )


def plan(
    shape: ModelShape,
    *,
    preset: str,
    workers: int,
    micro_batch_size: int,
    max_length: int,
    gradient_accumulation_steps: int = 1,
    gradient_checkpointing: bool,
    gpu: str = "",
    gpu_memory_gib: float | None = None,
    gpus_per_node: int | None = None,
    on_cpu: bool = False,
    node_memory_gib: float | None = None,
    overrides: dict | None = None,
    mfu: float = MFU,
) -> MemoryPlan:
    """The plan for one choice of micro-batch and checkpointing (``choose`` picks them).

    ``gpu`` is a Ray accelerator type (default: the preset's reference GPU). ``on_cpu``
    (the cpu preset, or a GPU preset rehearsed on CPUs) puts all ``workers`` on one node
    and compares with its RAM. ``overrides`` are the run's DeepSpeed overrides.
    """
    ds_config = deepspeed_config.merge(deepspeed_config.PRESETS[preset], overrides or {})
    zero = ds_config["zero_optimization"]
    offload = "offload_optimizer" in zero
    dtype_bytes = deepspeed_config.model_dtype(ds_config).itemsize
    on_cpu = on_cpu or preset == "cpu"
    gpu = "" if on_cpu else gpu or REFERENCE_GPU.get(preset, "")
    memory = 0.0 if on_cpu else gpu_memory_gib or GPUS[gpu].memory_gib
    gpus_per_node = workers if on_cpu else gpus_per_node or min(workers, 8)
    partition, trained = shape.parameters / workers, shape.trainable_parameters / workers
    tokens = micro_batch_size * max_length
    activations = _activations(shape, tokens, max_length, dtype_bytes)
    per_gpu = _per_gpu(shape, zero, partition, trained, dtype_bytes, tokens, activations["with_checkpointing" if gradient_checkpointing else "without_checkpointing"])
    cpu = {"offloaded_state": (16 + dtype_bytes) * trained * gpus_per_node if offload else 0.0}
    cpu["workers"] = per_gpu["total"] * gpus_per_node if on_cpu else 0.0  # workers on CPUs hold everything in RAM
    cpu["total"] = sum(cpu.values())
    need, have = (cpu["total"], node_memory_gib) if on_cpu else (per_gpu["total"], memory)
    return MemoryPlan(
        preset=preset,
        gpu=gpu,
        gpu_memory_gib=memory,
        workers=workers,
        gpus_per_node=gpus_per_node,
        micro_batch_size=micro_batch_size,
        max_length=max_length,
        gradient_accumulation_steps=gradient_accumulation_steps,
        gradient_checkpointing=gradient_checkpointing,
        parameters=shape.parameters,
        trainable_parameters=shape.trainable_parameters,
        per_gpu_gib=_gib(per_gpu),
        activations_gib=_gib(activations),
        cpu_per_node_gib=_gib(cpu),
        model_states_gib=_gib(_model_states(shape, partition, trained, dtype_bytes, offload, gpus_per_node)),
        tokens_per_micro_batch=tokens,
        tokens_per_step=tokens * gradient_accumulation_steps * workers,
        fits=have is None or need <= GPU_HEADROOM * have * GIB,
        time=_time(shape, gpu, workers, gradient_checkpointing, mfu),
    )


def advice(plan_: MemoryPlan, *, micro_batch_fixed: bool, checkpointing_fixed: bool) -> str:
    """What would make a run fit that its plan has not already tried."""
    if not plan_.gpu:
        return "pass fewer workers (--num-workers) or a smaller --max-length, or use a node with more RAM"
    steps = []
    if micro_batch_fixed and plan_.micro_batch_size > 1:
        steps.append("a smaller --micro-batch-size")
    if checkpointing_fixed and not plan_.gradient_checkpointing:
        steps.append("--gradient-checkpointing")
    if plan_.preset == "a100":
        steps.append("a preset that offloads Adam to CPU RAM (--preset a10)")
    steps += ["more workers (--num-workers)", "a smaller --max-length", "--gpu-memory-gib if the GPUs have more memory"]
    return "pass " + ", ".join(steps[:-1]) + " or " + steps[-1]


def _per_gpu(shape: ModelShape, zero: dict, partition: float, trained: float, dtype_bytes: int, tokens: int, activations: float) -> dict[str, float]:
    """``partition``: this GPU's share of the parameters; ``trained``: of the trainable ones."""
    offload = "offload_optimizer" in zero
    per_gpu = {
        "parameters": dtype_bytes * partition,
        "gathered_parameters": dtype_bytes * min(zero["stage3_max_live_parameters"], shape.parameters),
        "gradients": 0.0 if offload else dtype_bytes * trained,
        "optimizer_state": 0.0 if offload else 16 * trained,  # fp32 master and gradients, Adam's moments
        "activations": activations,
        "logits": 10 * shape.vocab * tokens,
        "buffers": dtype_bytes * (2 * min(zero["reduce_bucket_size"], shape.parameters) + min(zero["stage3_prefetch_bucket_size"], shape.parameters)),
    }
    return {**per_gpu, "total": sum(per_gpu.values())}


def _model_states(shape: ModelShape, partition: float, trained: float, dtype_bytes: int, offload: bool, gpus_per_node: int) -> dict[str, float]:
    """Parameters, gradients and optimizer state as DeepSpeed's estimator counts them."""
    gpu = dtype_bytes * partition + 4 * shape.largest_module_parameters + (0.0 if offload else 16 * trained)
    return {"gpu": gpu, "cpu_per_node": 16 * trained * gpus_per_node if offload else 0.0}


def _activations(shape: ModelShape, tokens: int, max_length: int, dtype_bytes: int) -> dict[str, float]:
    """Saved activations of one micro-batch: every layer's, or with gradient checkpointing
    each layer's input plus one layer's while it is recomputed."""
    per_layer_token = shape.activation_bytes_per_token(max_length, dtype_bytes)
    return {
        "without_checkpointing": shape.layers * per_layer_token * tokens,
        "with_checkpointing": (shape.layers * shape.hidden * dtype_bytes + per_layer_token) * tokens,
    }


def choose(shape: ModelShape, *, micro_batch_size: int | None, gradient_checkpointing: bool | None, **kwargs) -> MemoryPlan:
    """The plan with the largest micro-batch that fits (without checkpointing where it fits
    at that size), keeping whichever of the two the flags fixed. When nothing fits, the
    plan of the smallest choice, with ``fits`` false."""
    sizes = [micro_batch_size] if micro_batch_size else list(MICRO_BATCH_CHOICES)
    checkpointing = [gradient_checkpointing] if gradient_checkpointing is not None else [False, True]
    candidates = [plan(shape, micro_batch_size=m, gradient_checkpointing=c, **kwargs) for m in sizes for c in checkpointing]
    return next((p for p in candidates if p.fits), candidates[-1])


def _time(shape: ModelShape, gpu: str, workers: int, checkpointing: bool, mfu: float) -> dict[str, Any]:
    """Training tokens per second at ``mfu`` of the GPUs' peak: 6 FLOPs per parameter and
    token (8 when checkpointing recomputes the forward pass), input embedding excluded.
    The time of an epoch comes with its token count (``MemoryPlan.with_epoch_tokens``)."""
    time: dict[str, Any] = {"assumed_mfu": None, "peak_tflops_per_gpu": None, "tokens_per_s": None, "epoch_tokens": None, "epoch_hours": None}
    if gpu:
        flops_per_token = (8 if checkpointing else 6) * (shape.parameters - shape.embedding_parameters)
        tokens_per_s = mfu * GPUS[gpu].peak_tflops * 1e12 * workers / flops_per_token
        time.update(assumed_mfu=mfu, peak_tflops_per_gpu=GPUS[gpu].peak_tflops, tokens_per_s=round(tokens_per_s))
    return time


def _gib(values: dict[str, float]) -> dict[str, float]:
    return {key: round(value / GIB, 2) for key, value in values.items()}
