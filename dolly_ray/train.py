"""Dolly instruction tuning as a Ray Train job: TorchTrainer workers running DeepSpeed ZeRO-3.

The driver prepares the records with Ray Data (validation counts and strict errors
come before any GPU is reserved), plans the step count, and starts the trainer. Each
worker loads the model already partitioned, trains on its deterministic shard, and
reports metrics and checkpoints to Ray Train. Rerunning with the same storage path and
name resumes from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from dolly_ray import checkpoint as ckpt
from dolly_ray.cli import option
from dolly_ray import batching, data, deepspeed_config, generation

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything one training run needs; YAML files and CLI flags fill it."""

    # What to train, on what.
    model: str = option("EleutherAI/gpt-j-6B", "model to tune: hub id or directory (safetensors weights)")
    dataset: str = option("tatsu-lab/alpaca", "hub dataset id, `datasets` directory, or JSON/JSONL/Parquet path or URL")
    columns: str = option("alpaca", "column schema: alpaca, dolly, or instruction=A,input=B,output=C")
    split: str = option("train", "split to read from a Hugging Face dataset")
    max_length: int = option(1024, "longest record in tokens; longer records are skipped and counted")
    eval_fraction: float = option(0.02, "fraction of records held out for eval loss")
    strict_data: bool = option(False, "stop at the first invalid record instead of skipping it")
    trust_remote_code: bool = option(False, "allow model/tokenizer code from the model repository")
    allow_pickle: bool = option(False, "also load pickle (.bin) weights, which can run code when loaded (default: safetensors only)")
    # How long and how fast.
    epochs: int = option(1, "passes over the training records")
    max_steps: int = option(0, "total optimizer steps (0: `epochs` full epochs)")
    stop_after_steps: int = option(0, "end this job at this step with a checkpoint, keeping the full schedule; rerun to continue")
    learning_rate: float = option(1e-5, "peak learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_steps: int = option(10, "linear warmup steps before linear decay to 0")
    micro_batch_size: int = option(8, "records per worker per forward pass")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    batching: str = option("pack", "micro-batches: pack (records packed whole into max_length-token rows; micro_batch_size counts packed rows), group (length-grouped records) or pad (random records padded to the longest, Dolly's way)")
    shuffle_buffer_rows: int = option(1024, "rows in each worker's shuffle buffer (reshuffled every epoch)")
    seed: int = option(42, "seed for initialisation, shuffling and the eval split")
    # How often.
    log_every: int = option(10, "report metrics every N optimizer steps")
    eval_every: int = option(100, "eval loss every N steps (0: only at the end)")
    checkpoint_every: int = option(200, "checkpoint every N steps (0: only at the end)")
    hf_model_every_checkpoint: bool = option(False, "also write the Hugging Face model at every checkpoint, not only the last")
    # Where and on what.
    num_workers: int = option(8, "training workers (one per GPU)")
    use_gpu: bool = option(None, "train on GPUs (default: per preset; with auto, yes when the cluster has GPUs)")
    cpus_per_worker: float = option(4.0, "CPUs reserved per worker (optimizer offload uses them)")
    preset: str = option("auto", "DeepSpeed preset: a100, a10, v100, cpu, or auto (from the workers' GPUs; cpu without GPUs)")
    accelerator_type: str = option("", "only train on GPUs of this Ray accelerator type, e.g. A10G, V100, A100 (empty: any)")
    deepspeed: dict = option({}, "DeepSpeed config overrides merged over the preset (JSON)")
    storage_path: str = option("~/ray_results", "where Ray Train keeps checkpoints: local path, NFS or s3://")
    name: str = option("dolly_ray", "run name; rerunning a name resumes it")
    num_to_keep: int = option(2, "checkpoints kept (the latest ones)")
    max_failures: int = option(0, "worker failures to recover from by restarting at the latest checkpoint")
    tensorboard_dir: str = option("", "write TensorBoard logs here (rank 0; empty: off)")
    # Greedy generations from the trained weights, reported with the final metrics.
    sample_prompts: list = option([], "records ({instruction, input}) to answer greedily at the end (YAML/JSON)")

    def __post_init__(self):
        if self.preset != deepspeed_config.AUTO and self.preset not in deepspeed_config.PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(deepspeed_config.PRESETS)} or auto")
        if self.preset != deepspeed_config.AUTO:  # auto is settled by resolve_auto_preset
            if self.use_gpu is None:
                self.use_gpu = self.preset in deepspeed_config.GPU_PRESETS
            elif self.use_gpu != (self.preset in deepspeed_config.GPU_PRESETS):
                raise ValueError(f"preset {self.preset!r} {'needs GPUs' if self.preset != 'cpu' else 'is for CPU-only runs'}; use_gpu={self.use_gpu} contradicts it")
        if self.accelerator_type and self.use_gpu is False:
            raise ValueError(f"accelerator_type {self.accelerator_type!r} selects GPUs; use_gpu=False (or preset cpu) contradicts it")
        for name in ("epochs", "micro_batch_size", "gradient_accumulation_steps", "num_workers", "max_length", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        batching.check_strategy(self.batching)

    @property
    def data_config(self) -> data.DataConfig:
        return data.DataConfig(
            source=self.dataset,
            columns=self.columns,
            split=self.split,
            max_length=self.max_length,
            eval_fraction=self.eval_fraction,
            seed=self.seed,
            strict=self.strict_data,
        )


@dataclass(frozen=True)
class Plan:
    """Step counts fixed on the driver so every worker stops at the same step."""

    micro_batches_per_epoch: int
    total_steps: int
    eval_batches: int


def plan_steps(config: TrainConfig, train_rows: int, eval_rows: int) -> Plan:
    rows_per_worker = train_rows // config.num_workers
    if rows_per_worker == 0:
        raise data.DataError(f"{train_rows} training records cannot feed {config.num_workers} workers")
    micro_batches = math.ceil(rows_per_worker / config.micro_batch_size)
    epoch_steps = micro_batches // config.gradient_accumulation_steps
    if epoch_steps == 0:
        raise data.DataError(
            f"one epoch has {micro_batches} micro-batches per worker, fewer than gradient_accumulation_steps "
            f"{config.gradient_accumulation_steps}"
        )
    total = config.max_steps or epoch_steps * config.epochs
    eval_batches = math.ceil((eval_rows // config.num_workers) / config.micro_batch_size)
    return Plan(micro_batches_per_epoch=epoch_steps * config.gradient_accumulation_steps, total_steps=total, eval_batches=eval_batches)


def resolve_auto_preset(config: TrainConfig, cluster_gpus: float) -> TrainConfig:
    """Settle ``preset=auto`` on the driver: GPUs or not.

    Without GPUs in the cluster (and no --use-gpu or --accelerator-type asking to wait
    for the autoscaler to add some) the run uses the cpu preset. With GPUs the preset
    stays auto and each worker picks it from the device it got (``preset_for_gpu``).
    """
    if config.preset != deepspeed_config.AUTO:
        return config
    use_gpu = config.use_gpu if config.use_gpu is not None else bool(cluster_gpus or config.accelerator_type)
    if not use_gpu:
        logger.info("preset auto: no GPUs in the cluster, using the cpu preset")
        return dataclasses.replace(config, preset="cpu", use_gpu=False)
    return dataclasses.replace(config, use_gpu=True)


class DeterministicSplit(ray.train.DataConfig):
    """A Ray Train DataConfig that gives each worker the same rows on every run.

    Ray's default streaming split hands blocks to whichever worker asks first; exact
    resume needs each worker's sequence to be reproducible, so the materialized
    datasets are split by position instead.
    """

    def configure(self, datasets, world_size, worker_handles=None, worker_node_ids=None, **kwargs):
        output = [{} for _ in range(world_size)]
        for name, dataset in datasets.items():
            for rank, shard in enumerate(dataset.split(world_size, equal=True)):
                output[rank][name] = shard.iterator()
        return output


def run(config: TrainConfig) -> dict[str, Any]:
    """Prepare the data, train, and return the run summary (the job's last output line)."""
    if config.tensorboard_dir and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("tensorboard_dir needs the tensorboard package: pip install 'dolly_ray[tensorboard]'")
    check_model(config)
    # A fixed row order, so DeterministicSplit gives each worker the same rows on every run.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    prepared = data.PreparedData(config.data_config, config.model, trust_remote_code=config.trust_remote_code)
    report = prepared.materialize().report()  # one pass feeds the counts, train and eval
    # Packing (for batching=pack) happens here, so the plan counts the rows workers get.
    train_ds = batching.prepare(prepared.train, config.batching, config.max_length, config.seed).materialize()
    eval_ds = batching.prepare(prepared.eval, config.batching, config.max_length, config.seed).materialize()
    plan = plan_steps(config, train_ds.count(), eval_ds.count())
    logger.info("plan: %s optimizer steps, %s micro-batches per epoch per worker", plan.total_steps, plan.micro_batches_per_epoch)
    config = resolve_auto_preset(config, ray.cluster_resources().get("GPU", 0))

    storage_path = config.storage_path if "://" in config.storage_path else os.path.abspath(os.path.expanduser(config.storage_path))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": dataclasses.asdict(config), "plan": dataclasses.asdict(plan)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})},
            accelerator_type=config.accelerator_type or None,
        ),
        run_config=ray.train.RunConfig(
            name=config.name,
            storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
        ),
        datasets={"train": train_ds, "eval": eval_ds},
        dataset_config=DeterministicSplit(),
    )
    result = trainer.fit()
    metrics = result.metrics or {}
    checkpoint_path = result.checkpoint.path if result.checkpoint else None
    return {
        "checkpoint": checkpoint_path,
        "hf_model": os.path.join(checkpoint_path, ckpt.HF_DIR) if checkpoint_path else None,
        "train_loss": metrics.get("train_loss"),
        "eval_loss": metrics.get("eval_loss"),
        "steps": metrics.get("step"),
        "epoch": metrics.get("epoch"),
        "finished": metrics.get("finished"),
        "preset": metrics.get("preset"),
        "tokens_per_s": metrics.get("tokens_per_s"),
        "train_records": report.train_rows,
        "eval_records": report.eval_rows,
        "skipped_records": report.skipped,
        "param_partition_fractions": metrics.get("param_partition_fractions"),
        "samples": metrics.get("samples", []),
    }


def check_model(config: TrainConfig) -> None:
    """Refuse on the driver what every worker would refuse later (see ``generation.check_model``)."""
    generation.check_model(config.model, trust_remote_code=config.trust_remote_code, allow_pickle=config.allow_pickle)


# --- the worker side ---------------------------------------------------------------


def _load_model(config: TrainConfig, ds_config: dict, tokenizer):
    """The model, partitioned across ranks as it loads (never whole on one worker)."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    # Must exist (and stay referenced) before from_pretrained: it turns on zero.Init.
    hf_ds_config = HfDeepSpeedConfig(ds_config)
    model = AutoModelForCausalLM.from_pretrained(
        config.model, dtype=deepspeed_config.model_dtype(ds_config), use_safetensors=None if config.allow_pickle else True, trust_remote_code=config.trust_remote_code
    )
    # num_embeddings is the module's own count, valid while the weight is partitioned.
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model, hf_ds_config


class _Worker:
    """One Ray Train worker's state: engine, data position and metric window."""

    def __init__(self, config: TrainConfig, plan: Plan):
        import deepspeed
        import torch

        from dolly_ray import prompts

        self.config, self.plan = config, plan
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        torch.manual_seed(config.seed)
        # Ray Train has set up torch.distributed; DeepSpeed's comm layer adopts it.
        deepspeed.init_distributed(dist_backend="nccl" if config.use_gpu else "gloo")
        self.preset = self._agreed_gpu_preset() if config.preset == deepspeed_config.AUTO else config.preset
        self.ds_config = deepspeed_config.build(
            self.preset,
            world_size=self.world_size,
            micro_batch_size=config.micro_batch_size,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            learning_rate=config.learning_rate,
            weight_decay=config.weight_decay,
            warmup_steps=config.warmup_steps,
            total_steps=plan.total_steps,
            overrides=config.deepspeed,
        )
        self.tokenizer = prompts.load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
        model, self._hf_ds_config = _load_model(config, self.ds_config, self.tokenizer)
        if config.batching == "pack":
            batching.check_packing_attention(model.config)
        optimizer = None
        if deepspeed_config.uses_client_optimizer(self.preset):
            optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            model_parameters=None if optimizer else model.parameters(),
            config=self.ds_config,
        )
        self.micro_batches_done = 0
        self.history: list[dict] = []
        self.tensorboard = None
        if config.tensorboard_dir and self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(os.path.join(os.path.expanduser(config.tensorboard_dir), config.name))

    def _agreed_gpu_preset(self) -> str:
        """``preset=auto`` on GPUs: the preset for this worker's GPU, which every worker must share."""
        import torch
        import torch.distributed as dist

        device = torch.cuda.get_device_properties(torch.cuda.current_device())
        mine = (deepspeed_config.preset_for_gpu((device.major, device.minor), device.total_memory / 2**30), device.name)
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, mine)
        if len({preset for preset, _ in everyone}) > 1:
            raise RuntimeError(
                f"preset auto: the workers have GPUs that need different presets {sorted(set(everyone))}; "
                "pass --preset, or --accelerator-type to train on one kind of GPU"
            )
        if self.rank == 0:
            logger.info("preset auto: chose %s for %s (%.0f GiB)", mine[0], device.name, device.total_memory / 2**30)
        return mine[0]

    # -- data --

    def batches(self, name: str, epoch: int):
        return batching.micro_batches(
            ray.train.get_dataset_shard(name),
            self.config.batching,
            micro_batch_size=self.config.micro_batch_size,
            pad_token_id=self.tokenizer.pad_token_id,
            shuffle_rows=self.config.shuffle_buffer_rows,
            seed=self.config.seed + epoch if name == "train" else None,
        )

    # -- steps --

    def _all_reduce_sum(self, *values: float) -> list[float]:
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def evaluate(self) -> float | None:
        """Token-weighted mean loss over every worker's eval shard."""
        import torch

        if self.plan.eval_batches == 0:
            return None
        self.engine.eval()
        loss_sum = tokens = 0.0
        with torch.no_grad():
            for i, batch in enumerate(self.batches("eval", 0)):
                if i == self.plan.eval_batches:
                    break
                batch.pop(batching.NUM_TOKENS)
                n = float(batching.label_tokens(batch))
                batch = {k: v.to(self.engine.device) for k, v in batch.items()}
                loss_sum += float(self.engine(**batch, use_cache=False).loss) * n
                tokens += n
        self.engine.train()
        loss_sum, tokens = self._all_reduce_sum(loss_sum, tokens)
        return loss_sum / max(tokens, 1.0)

    def report(self, metrics: dict, save: bool, final: bool = False) -> None:
        self.history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        if self.tensorboard:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, metrics["step"])
        if not save:
            ray.train.report(metrics)
            return
        directory = tempfile.mkdtemp(prefix="dolly_ray_ckpt_")
        try:
            ckpt.save(
                self.engine,
                self.tokenizer,
                directory,
                client_state={"micro_batches_done": self.micro_batches_done},
                history=self.history,
                with_hf_model=final or self.config.hf_model_every_checkpoint,
            )
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def restore(self) -> None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return
        with checkpoint.as_directory() as directory:
            client_state, self.history = ckpt.load(self.engine, directory)
        self.micro_batches_done = client_state["micro_batches_done"]
        logger.info("rank %d resumed at step %d", self.rank, self.engine.global_steps)

    def samples(self) -> list[dict]:
        """Greedy answers from the trained (still partitioned) weights.

        Every rank generates the same prompts greedily, so all take the same number of
        forward passes and the ZeRO-3 parameter gathers stay in step.
        """
        from dolly_ray.generation import GenerationParams, InstructionGenerator

        if not self.config.sample_prompts:
            return []
        generator = InstructionGenerator(self.engine.module, self.tokenizer)
        results = generator.generate(self.config.sample_prompts, GenerationParams(greedy=True, max_new_tokens=64), batch_size=1)
        return [{**prompt, "response": r.response, "finish_reason": r.finish_reason} for prompt, r in zip(self.config.sample_prompts, results)]

    @property
    def stop_step(self) -> int:
        """Where this job ends: the planned total, or earlier when told to stop early."""
        stop = self.config.stop_after_steps
        return min(stop, self.plan.total_steps) if stop > 0 else self.plan.total_steps

    def partition_fractions(self) -> list[float]:
        """Each rank's share of the parameter elements it holds: about 1/world under ZeRO-3."""
        local = sum(p.ds_tensor.numel() for p in self.engine.module.parameters())
        total = sum(p.ds_numel for p in self.engine.module.parameters())
        shares = [0.0] * self.world_size
        shares[self.rank] = local / total
        return self._all_reduce_sum(*shares)

    def train(self) -> None:
        self.restore()
        while self.engine.global_steps < self.stop_step:
            epoch, done_in_epoch = divmod(self.micro_batches_done, self.plan.micro_batches_per_epoch)
            self.train_epoch(epoch, done_in_epoch)
        if self.tensorboard:
            self.tensorboard.close()

    def train_epoch(self, epoch: int, done_in_epoch: int) -> None:
        """Micro-batches of one epoch, from position ``done_in_epoch`` (after a restore)."""
        engine, plan, config = self.engine, self.plan, self.config
        window, step_batches = self._new_window(), []
        position = -1
        for position, batch in enumerate(self.batches("train", epoch)):
            if position < done_in_epoch:
                continue  # trained before the restore point (always a step boundary)
            step_batches.append(batch)
            if len(step_batches) == config.gradient_accumulation_steps:
                self.train_step(step_batches, window)
                step_batches = []
                if self.after_step(window):
                    window = self._new_window()
            if position + 1 == plan.micro_batches_per_epoch or engine.global_steps >= self.stop_step:
                return
        raise RuntimeError(
            f"rank {self.rank}: epoch {epoch} ended after {position + 1} micro-batches, "
            f"planned {plan.micro_batches_per_epoch}"
        )

    @staticmethod
    def _new_window() -> dict:
        """Sums over the steps since the last report: token losses, label and useful tokens."""
        return {"loss_sum": 0.0, "label_tokens": 0, "tokens": 0, "start": time.perf_counter()}

    def train_step(self, step_batches: list[dict], window: dict) -> None:
        """One optimizer step over its micro-batches, with the loss per label token of the whole step.

        Every label token of the step, on every worker, weighs the same whatever the
        batching: the summed token losses are divided by the step's label tokens on all
        workers. DeepSpeed divides by the accumulation steps and averages gradients
        over workers, so the divisor handed to the model is scaled back by both.
        """
        engine = self.engine
        local_tokens = sum(batching.label_tokens(batch) for batch in step_batches)
        (step_tokens,) = self._all_reduce_sum(local_tokens)
        per_micro_batch = max(step_tokens, 1.0) / (self.world_size * len(step_batches))
        for batch in step_batches:
            window["tokens"] += int(batch.pop(batching.NUM_TOKENS))
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            loss = engine(**batch, use_cache=False, num_items_in_batch=per_micro_batch).loss
            engine.backward(loss)
            engine.step()
            self.micro_batches_done += 1
            window["loss_sum"] += loss.item() * per_micro_batch
        window["label_tokens"] += local_tokens

    def after_step(self, window: dict) -> bool:
        """Log, evaluate and checkpoint on their cadence; True when the window was reported."""
        config, step = self.config, self.engine.global_steps
        final = step >= self.stop_step
        evaluate = final or (config.eval_every and step % config.eval_every == 0)
        save = final or (config.checkpoint_every and step % config.checkpoint_every == 0)
        if not (evaluate or save or step % config.log_every == 0):
            return False
        loss_sum, label_tokens, tokens = self._all_reduce_sum(window["loss_sum"], window["label_tokens"], window["tokens"])
        metrics = {
            "step": step,
            "epoch": self.micro_batches_done / self.plan.micro_batches_per_epoch,
            "train_loss": loss_sum / max(label_tokens, 1.0),  # per token, like eval_loss
            "learning_rate": self.engine.get_lr()[0],
            "tokens_per_s": tokens / (time.perf_counter() - window["start"]),
        }
        if evaluate:
            metrics["eval_loss"] = self.evaluate()
        if final:
            metrics["finished"] = step >= self.plan.total_steps
            metrics["preset"] = self.preset
            metrics["param_partition_fractions"] = self.partition_fractions()
            metrics["samples"] = self.samples()
        self.report(metrics, save=bool(save), final=final)
        return True


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point on every worker."""
    # Worker processes start with logging unconfigured: let this package's INFO lines reach the job log.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("dolly_ray").setLevel(logging.INFO)
    config = TrainConfig(**loop_config["config"])
    plan = Plan(**loop_config["plan"])
    _Worker(config, plan).train()
