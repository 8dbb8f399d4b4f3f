"""Settling a training run on the driver: every choice the flags left open, and every
refusal, before anything is reserved.

Top to bottom: the model loads and the dataset is there (``models``, ``storage``); the
cluster is joined or started (``cluster``); the preset follows from its GPUs; the CPUs
per worker from what Ray Data leaves; the micro-batch and gradient checkpointing from
the memory plan (``memory_plan``, arithmetic on the model's config). ``refuse_unfit``
then refuses a run that cannot fit its GPUs, or whose workers the cluster can never
grant, with what would make it fit.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging

from dolly_ray import cluster, models, storage
from dolly_ray.cli import ConfigError
from dolly_ray.train import deepspeed_config, memory_plan
from dolly_ray.train.config import DEFAULT_CPUS_PER_WORKER, TrainConfig

logger = logging.getLogger(__name__)


def settle(config: TrainConfig) -> tuple[TrainConfig, memory_plan.MemoryPlan | None]:
    """The run as it will train (preset, ``use_gpu``, CPUs per worker, micro-batch and
    checkpointing decided; storage paths absolute) and its memory plan. A model the plan
    cannot build on the meta device gets no plan, and the old defaults."""
    if config.tensorboard_dir and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("tensorboard_dir needs the tensorboard package: pip install 'dolly_ray[tensorboard]'")
    model_config = models.check_loadable_model(
        config.model, trust_remote_code=config.trust_remote_code, allow_pickle=config.allow_pickle, need_weights=not config.dry_run
    )
    if storage.missing_local(config.dataset):
        raise ConfigError(f"dataset not found: {config.dataset}")
    cluster.init_ray()
    preset, use_gpu = preset_on_driver(config.preset, config.use_gpu, config.accelerator_type, cluster.total("GPU"))
    if preset in deepspeed_config.GPU_PRESETS and not use_gpu:
        logger.warning("preset %s on CPUs: a rehearsal of the GPU preset (its precision, offload and loss scaling) by DeepSpeed's CPU accelerator", preset)
    config = dataclasses.replace(
        config,
        preset=preset,
        use_gpu=use_gpu,
        cpus_per_worker=cluster.cpus_each(config.cpus_per_worker, config.num_workers, DEFAULT_CPUS_PER_WORKER),
        # Workers on other nodes, in other working directories, must write where the driver means.
        storage_path=storage.absolute(config.storage_path),
        tensorboard_dir=config.tensorboard_dir and storage.absolute(config.tensorboard_dir),
    )
    memory = plan_memory(config, model_config)
    if memory is None:
        return dataclasses.replace(config, micro_batch_size=config.micro_batch_size or 8, gradient_checkpointing=bool(config.gradient_checkpointing)), None
    logger.info("memory plan: %s", memory.summary())
    return dataclasses.replace(config, micro_batch_size=memory.micro_batch_size, gradient_checkpointing=memory.gradient_checkpointing), memory


def preset_on_driver(preset: str, use_gpu: bool | None, accelerator_type: str, cluster_gpus: float) -> tuple[str, bool]:
    """``(preset, use_gpu)`` once the driver knows the cluster.

    ``auto`` on a cluster without GPUs (and no ``use_gpu`` or ``accelerator_type``
    asking to wait for the autoscaler to add some) is ``cpu``. With GPUs it stays
    ``auto``: each worker picks the preset from the device it got
    (``deepspeed_config.agreed_gpu_preset``).
    """
    if preset != deepspeed_config.AUTO:
        return preset, bool(use_gpu)
    if use_gpu is None:
        use_gpu = bool(cluster_gpus or accelerator_type)
    if not use_gpu:
        logger.info("preset auto: no GPUs in the cluster, using the cpu preset")
        return "cpu", False
    return deepspeed_config.AUTO, True


def preset_for_accelerator(accelerator_type: str, memory_gib: float | None = None) -> str:
    """The preset a worker on this GPU type would choose (see ``deepspeed_config.preset_for_gpu``)."""
    gpu = memory_plan.GPUS[accelerator_type]
    return deepspeed_config.preset_for_gpu(gpu.compute_capability, memory_gib or gpu.memory_gib)


def plan_memory(config: TrainConfig, model_config) -> memory_plan.MemoryPlan | None:
    """The plan with the largest micro-batch that fits, on the GPU type the workers will
    get (``auto``: the preset such a GPU chooses; an unknown GPU: a10's)."""
    gpu = config.accelerator_type or cluster.gpu_type()
    gpu = gpu if gpu in memory_plan.GPUS and config.use_gpu else ""
    preset = config.preset
    if preset == deepspeed_config.AUTO:
        preset = preset_for_accelerator(gpu, config.gpu_memory_gib) if gpu else "a10"
    try:
        shape = memory_plan.ModelShape.from_config(model_config, trust_remote_code=config.trust_remote_code, lora_settings=config.lora_settings())
    except ConfigError:  # LoRA targets the model does not have
        raise
    except Exception as e:  # a model class that cannot be built without its weights
        logger.warning("no memory plan for %s: %s: %s", config.model, type(e).__name__, e)
        return None
    return memory_plan.choose(
        shape,
        preset=preset,
        workers=config.num_workers,
        micro_batch_size=config.micro_batch_size,
        gradient_checkpointing=config.gradient_checkpointing,
        max_length=config.max_length,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        gpu=gpu,
        gpu_memory_gib=config.gpu_memory_gib,
        gpus_per_node=int(cluster.largest_node("GPU")) or None,
        on_cpu=not config.use_gpu,
        node_memory_gib=cluster.node_memory_gib(),
        overrides=config.deepspeed,
    )


def refuse_unfit(original: TrainConfig, settled: TrainConfig, memory: memory_plan.MemoryPlan | None) -> None:
    """Refuse a run that does not fit its GPUs' (or node's) memory, with what the flags of
    ``original`` left to try, and one whose workers the cluster can never grant."""
    if memory is not None and not memory.fits:
        fixed = {"micro_batch_fixed": original.micro_batch_size is not None, "checkpointing_fixed": original.gradient_checkpointing is not None}
        raise ConfigError(f"the run does not fit: {memory.summary()}; {memory_plan.advice(memory, **fixed)}")
    cluster.check_fits(worker_request(settled))


def worker_request(config: TrainConfig) -> cluster.Request:
    each = {"CPU": config.cpus_per_worker, "GPU": 1.0 if config.use_gpu else 0.0}
    if config.accelerator_type:
        each[f"accelerator_type:{config.accelerator_type}"] = 0.001  # what ScalingConfig asks of each worker
    return cluster.Request(
        unit="worker",
        count=config.num_workers,
        count_flag="--num-workers",
        each=each,
        fixes={
            "CPU": "pass --cpus-per-worker {fits} or fewer workers (--num-workers)",
            "GPU": "pass --preset cpu to train on CPUs, or fewer workers (--num-workers)",
            f"accelerator_type:{config.accelerator_type}": "pass the --accelerator-type of GPUs this cluster has, or none",
        },
    )
