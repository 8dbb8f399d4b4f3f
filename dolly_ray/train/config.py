"""What one training run is told (every flag of ``jobs/train.py``) and the step plan its workers share.

No Ray import: benchmarks and the GPU check build engines from it without a cluster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dolly_ray.cli import ConfigError, check_at_least, option
from dolly_ray.records.sources import DataError
from dolly_ray.train import batching, data, deepspeed_config

# Enough for DeepSpeed's CPU Adam on the offloaded optimizer state of one GPU's partition.
DEFAULT_CPUS_PER_WORKER = 4.0


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
    micro_batch_size: int | None = option(None, "records (pad, group) or packed rows (pack) per worker per forward pass (default: the largest of 8, 4, 2, 1 that the memory plan fits)")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    lora_r: int = option(0, "LoRA rank: train low-rank adapters (peft) and the prompt keys' embedding rows, every other weight frozen (0: train every weight)")
    lora_alpha: float = option(16.0, "LoRA scaling numerator: adapters add alpha / r x B A")
    lora_dropout: float = option(0.05, "dropout on the adapters' inputs")
    lora_target_modules: str = option("all-linear", "modules that get adapters: all-linear (every linear layer of attention and MLP) or comma-separated names, e.g. q_proj,v_proj")
    gradient_checkpointing: bool | None = option(None, "recompute activations in backward to save memory (default: only where the memory plan needs it)")
    batching: str = option("pack", "micro-batches: pack (records packed whole into max_length-token rows; micro_batch_size counts packed rows), group (length-grouped records) or pad (random records padded to the longest, Dolly's way)")
    shuffle_buffer_rows: int = option(1024, "rows in each worker's shuffle window: every epoch a worker reads its windows in a new order and shuffles the rows within each")
    seed: int = option(42, "seed for initialisation, shuffling and the eval split")
    # How often.
    log_every: int = option(10, "report metrics every N optimizer steps")
    verbose: bool = option(False, "show Ray's and the libraries' own INFO lines and known warnings on the console (Ray's log files keep them anyway)")
    eval_every: int = option(100, "eval loss every N steps (0: only at the end)")
    eval_generate: int = option(0, "at each eval, also answer this many held-out records greedily (the same ones every time) and report exact match, ROUGE-L and the share stopped at ### End (0: off)")
    eval_generate_max_new_tokens: int = option(128, "longest answer --eval-generate lets the model write, in tokens")
    checkpoint_every: int = option(200, "checkpoint every N steps (0: only at the end)")
    hf_model_every_checkpoint: bool = option(False, "also write the Hugging Face model at every checkpoint, not only the last")
    # Where and on what.
    num_workers: int = option(8, "training workers (one per GPU)")
    use_gpu: bool = option(None, "train on GPUs (default: per preset; with auto, yes when the cluster has GPUs)")
    cpus_per_worker: float | None = option(None, f"CPUs reserved per worker, used by optimizer offload (default: {DEFAULT_CPUS_PER_WORKER:g}; on a local Ray started by this job, a share of the CPUs Ray Data leaves)")
    gpu_memory_gib: float | None = option(None, "GPU memory to plan for, e.g. 31.7 for V100 32GB (default: from --accelerator-type, the cluster's GPUs, or the preset's reference GPU)")
    preset: str = option("auto", "DeepSpeed preset: a100, a10, v100, cpu, or auto (from the workers' GPUs; cpu without GPUs)")
    accelerator_type: str = option("", "only train on GPUs of this Ray accelerator type, e.g. A10G, V100, A100 (empty: any)")
    deepspeed: dict = option({}, "DeepSpeed config overrides merged over the preset (JSON)")
    storage_path: str = option("~/ray_results", "where Ray Train keeps checkpoints: local path, NFS or s3://")
    name: str = option("dolly_ray", "run name; rerunning a name with the same settings resumes it (other settings are refused: see --restart)")
    restart: bool = option(False, "delete the run's folder under --storage-path/--name (its checkpoints) first and train from step 0")
    num_to_keep: int = option(2, "checkpoints kept (the latest ones)")
    checkpoint_upload: str = option("async", "async: training goes on while a checkpoint uploads to --storage-path; sync: it waits")
    max_failures: int = option(0, "worker failures to recover from by restarting at the latest checkpoint")
    tensorboard_dir: str = option("", "write TensorBoard logs here (rank 0; empty: off)")
    # Greedy generations from the trained weights, reported with the final metrics.
    sample_prompts: list = option([], "records ({instruction, input}) to answer greedily at the end (YAML/JSON)")
    dry_run: bool = option(False, "print the memory and time plan (and the data's token counts for a local or remote dataset) and start no training")

    def __post_init__(self):
        self.use_gpu = deepspeed_config.check_preset(self.preset, self.use_gpu, self.accelerator_type)
        check_at_least(self, 1, "epochs", "micro_batch_size", "gradient_accumulation_steps", "num_workers", "max_length", "log_every", "eval_generate_max_new_tokens", "shuffle_buffer_rows")
        check_at_least(self, 0, "eval_generate", "lora_r", "lora_dropout")
        if self.lora_dropout >= 1:
            raise ConfigError(f"--lora-dropout must be below 1, got {self.lora_dropout}")
        check_at_least(self, 0.01, "cpus_per_worker", "gpu_memory_gib")
        batching.check_strategy(self.batching)
        if self.checkpoint_upload not in ("async", "sync"):
            raise ConfigError(f"--checkpoint-upload must be async or sync, not {self.checkpoint_upload!r}")

    def lora_settings(self) -> dict | None:
        """``lora.add_adapters``' settings, or None for full fine-tuning."""
        if not self.lora_r:
            return None
        return {"r": self.lora_r, "alpha": self.lora_alpha, "dropout": self.lora_dropout, "targets": self.lora_target_modules}

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
            pack=self.batching == "pack",
        )


@dataclass(frozen=True)
class StepPlan:
    """Step counts fixed on the driver so every worker stops at the same step."""

    micro_batches_per_epoch: int
    total_steps: int
    eval_batches: int


def plan_steps(config: TrainConfig, train_rows: int, eval_rows: int) -> StepPlan:
    rows_per_worker = train_rows // config.num_workers
    if rows_per_worker == 0:
        raise DataError(f"{train_rows} training rows cannot feed {config.num_workers} workers (with --batching pack a row holds several records)")
    micro_batches = math.ceil(rows_per_worker / config.micro_batch_size)
    epoch_steps = micro_batches // config.gradient_accumulation_steps
    if epoch_steps == 0:
        raise DataError(
            f"one epoch has {micro_batches} micro-batches per worker, fewer than gradient_accumulation_steps "
            f"{config.gradient_accumulation_steps}"
        )
    total = config.max_steps or epoch_steps * config.epochs
    eval_batches = math.ceil((eval_rows // config.num_workers) / config.micro_batch_size)
    return StepPlan(micro_batches_per_epoch=epoch_steps * config.gradient_accumulation_steps, total_steps=total, eval_batches=eval_batches)


def stop_step(config: TrainConfig, plan: StepPlan) -> int:
    """Where this job ends: the planned total, or earlier when told to stop early."""
    stop = config.stop_after_steps
    return min(stop, plan.total_steps) if stop > 0 else plan.total_steps
