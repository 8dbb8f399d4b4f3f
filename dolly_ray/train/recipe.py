"""Dolly instruction tuning as a Ray Train job: TorchTrainer workers running DeepSpeed ZeRO-3.

The driver (``run``) settles the run (``settle``: every check and choice before anything
is reserved), checks a rerun against the run's saved settings (``run_settings``),
prepares the records once with Ray Data, or reuses what an earlier run prepared
(``prepared``: validation counts and strict errors come before any GPU is reserved),
plans the step count and starts the trainer. Each worker (``train_loop_per_worker``)
builds its engine with the model already partitioned, restores the latest checkpoint
if there is one, streams and trains its own row range of the prepared data, and
reports metrics and checkpoints to Ray Train. Rerunning with the same storage path,
name and settings resumes from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train.torch import TorchTrainer

from dolly_ray import cli, cluster, storage
from dolly_ray.cli import ConfigError
from dolly_ray.generate import scoring
from dolly_ray.train import batching, labels, memory_plan, prepared, run_settings, settle
from dolly_ray.train import checkpoint as ckpt
from dolly_ray.train.config import StepPlan, TrainConfig, plan_steps, stop_step
from dolly_ray.train.engine import build_engine

logger = logging.getLogger(__name__)

# Held-out records answered per generate call by --eval-generate.
ANSWER_BATCH_SIZE = 8
# Seeds of successive steps lie this far apart, so no two (step, rank) pairs share one.
STEP_SEED_STRIDE = 100_003
# Least seconds between two progress lines on the console (every report is in the history).
PROGRESS_INTERVAL_S = 30.0


# --- the driver ----------------------------------------------------------------------


def run(config: TrainConfig) -> dict[str, Any]:
    """Settle, prepare the data, train, and return the run summary (the job's last output line).

    Everything that would fail later is refused first (``settle``), before anything is
    reserved. With ``dry_run`` the summary is the memory plan instead.
    """
    settled, memory = settle.settle(config)
    if config.dry_run:
        return dry_run(settled, memory)
    settle.refuse_unfit(config, settled, memory)
    config = settled
    settings = run_settings.check_rerun(config)
    data = prepare_data(config, settings["dataset_fingerprint"])
    plan = plan_steps(config, data.rows("train"), data.rows("eval"))
    logger.info("plan: %s optimizer steps, %s micro-batches per epoch per worker", plan.total_steps, plan.micro_batches_per_epoch)
    answered = data.heldout(config.eval_generate)
    if len(answered) < config.eval_generate:
        logger.warning("--eval-generate %d: only %d held-out records to answer", config.eval_generate, len(answered))
    with cluster.log_pending(f"training run {config.name!r}"):
        result = make_trainer(config, plan, data, answered).fit()
    return run_summary(result, data, config)


def dry_run(config: TrainConfig, memory: memory_plan.MemoryPlan | None) -> dict[str, Any]:
    """The plan as the job's summary, with the training tokens of one epoch when the data
    can be read without a hub download (a local or remote file or directory)."""
    if memory is None:
        raise ConfigError(f"no memory plan can be made for {config.model} (see the warning above)")
    if storage.is_hub_id(config.dataset):
        logger.info("dry run: hub dataset %s not read; pass a local or remote copy for its token count", config.dataset)
    else:
        memory = memory.with_epoch_tokens(prepare_data(config).tokens("train"))
    return {"dry_run": True, **memory.as_dict()}


def prepare_data(config: TrainConfig, dataset_fingerprint: str | None = None) -> prepared.Prepared:
    """The training and eval rows as workers will batch them (packed for ``--batching
    pack``, so the plan counts the rows workers get): prepared once under the storage
    path, reused by every later run of the same data and settings."""
    return prepared.prepare(
        config.data_config, config.model, config.storage_path, trust_remote_code=config.trust_remote_code, dataset_fingerprint=dataset_fingerprint
    )


def make_trainer(config: TrainConfig, plan: StepPlan, data: prepared.Prepared, answered: list[dict]) -> TorchTrainer:
    """``answered``: the held-out records each evaluation answers (``--eval-generate``).
    Workers read their rows from the prepared parts themselves (``prepared.WorkerRows``):
    an exact, equal row range per rank, which exact resume needs and Ray Train's
    first-come streaming split does not give."""
    loop_config = {"config": dataclasses.asdict(config), "plan": dataclasses.asdict(plan), "answered": answered, "data": data.for_workers()}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})},
            accelerator_type=config.accelerator_type or None,
        ),
        run_config=ray.train.RunConfig(
            name=config.name,
            storage_path=config.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            # Ray Train's own INFO lines (each report, twice) stay in its log files.
            logging_config=ray.train.LoggingConfig(log_level="INFO" if config.verbose else "WARNING"),
        ),
    )


def run_summary(result: ray.train.Result, data: prepared.Prepared, config: TrainConfig) -> dict[str, Any]:
    """What the run produced and where, each location as another job takes it (a URI
    when it lives in object storage), and its final figures."""
    metrics = result.metrics or {}
    checkpoint = storage.uri_in(result.checkpoint.path, config.storage_path) if result.checkpoint else None
    hf_model = storage.join(checkpoint, ckpt.HF_DIR) if checkpoint else None
    return {
        "checkpoint": checkpoint,
        "hf_model": hf_model,
        "adapter": storage.join(checkpoint, ckpt.ADAPTER_DIR) if checkpoint and config.lora_r else None,
        "loss_curve": storage.join(hf_model, ckpt.LOSS_CURVE_FILE) if hf_model else None,
        "tensorboard": storage.join(config.tensorboard_dir, config.name) if config.tensorboard_dir else None,
        "train_loss": metrics.get("train_loss"),
        "eval_loss": metrics.get("eval_loss"),
        "steps": metrics.get("step"),
        "epoch": metrics.get("epoch"),
        "finished": metrics.get("finished"),
        "preset": metrics.get("preset"),
        "micro_batch_size": config.micro_batch_size,
        "gradient_checkpointing": config.gradient_checkpointing,
        "cpus_per_worker": config.cpus_per_worker,
        "tokens_per_s": metrics.get("tokens_per_s"),
        "checkpoint_save_s": metrics.get("checkpoint_save_s"),
        "checkpoint_upload_s": metrics.get("checkpoint_upload_s"),
        "train_records": data.report.train_rows,
        "eval_records": data.report.eval_rows,
        "skipped_records": data.report.skipped,
        "prepared_data": data.summary(),
        "worker_nodes": metrics.get("worker_nodes"),
        "param_partition_fractions": metrics.get("param_partition_fractions"),
        "samples": metrics.get("samples", []),
    }


# --- the worker ----------------------------------------------------------------------


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point on every worker: build, restore, then train to the stop step,
    reporting on the log, eval and checkpoint cadences."""
    config, plan, answered = TrainConfig(**loop_config["config"]), StepPlan(**loop_config["plan"]), loop_config["answered"]
    _log_to_job(config.verbose)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    train_rows, eval_rows = (prepared.WorkerRows(loop_config["data"], split, rank, world_size) for split in ("train", "eval"))
    engine, tokenizer, preset = build_engine(config, plan, world_size)
    progress = restore(engine)
    rank_0 = rank == 0
    tensorboard = TensorBoard(storage.join(config.tensorboard_dir, config.name)) if config.tensorboard_dir and rank_0 else None
    stop = stop_step(config, plan)
    console = ProgressLine(engine.global_steps, stop) if rank_0 else None
    window = Window()
    while engine.global_steps < stop:
        epoch, done_in_epoch = divmod(progress.micro_batches_done, plan.micro_batches_per_epoch)
        for step_batches in optimizer_steps(config, plan, train_rows, epoch, done_in_epoch, tokenizer.pad_token_id):
            # Dropout (LoRA's) draws from the step's own seed, so a resumed run draws the same masks.
            torch.manual_seed(config.seed + STEP_SEED_STRIDE * engine.global_steps + engine.global_rank)
            train_step(engine, step_batches, window)
            progress.micro_batches_done += len(step_batches)
            step = engine.global_steps
            final = step >= stop
            evaluating, saving = final or _every(config.eval_every, step), final or _every(config.checkpoint_every, step)
            if not (evaluating or saving or _every(config.log_every, step)):
                continue
            metrics = window.metrics(engine, epoch=progress.micro_batches_done / plan.micro_batches_per_epoch)
            if evaluating:
                metrics["eval_loss"] = evaluate(engine, config, plan, eval_rows, tokenizer.pad_token_id)
                metrics.update(score_answers(engine, tokenizer, answered, config.eval_generate_max_new_tokens))
            if final:
                metrics.update(final_metrics(engine, config, plan, tokenizer, preset))
            if saving:
                save_checkpoint(engine, tokenizer, metrics, progress, config, with_hf_model=final or config.hf_model_every_checkpoint)
            else:
                progress.record(metrics)
                report_metrics(metrics)
            if tensorboard:
                tensorboard.add(metrics, upload=saving)
            if console:
                console.show(metrics, final=final)
            window = Window()
            if final:
                break
    if tensorboard:
        tensorboard.close()


def _every(interval: int, step: int) -> bool:
    return bool(interval) and step % interval == 0


def _log_to_job(verbose: bool) -> None:
    """Worker processes start with logging unconfigured: let this package's INFO lines reach
    the job log, and its dependencies' known noise not."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("dolly_ray").setLevel(logging.INFO)
    cli.quiet_known_noise(verbose)
    if not verbose:
        # Ray Train echoes each report from every rank through a logger named by its file,
        # which RunConfig's LoggingConfig level does not reach.
        from ray.train.v2._internal.execution import context as ray_train_context

        logging.getLogger(ray_train_context.__file__).setLevel(logging.WARNING)


@dataclass
class ProgressLine:
    """Rank 0's progress on the job's console: step of total, loss, learning rate,
    tokens/s, elapsed and ETA, at most one line per ``PROGRESS_INTERVAL_S`` and the last
    step's. (Ray relays worker lines, so a redrawn bar cannot work here.)"""

    first_step: int  # where this attempt started (a resumed run starts past 0)
    stop_step: int
    start: float = field(default_factory=time.perf_counter)
    shown: float = float("-inf")

    def show(self, metrics: dict, *, final: bool) -> None:
        now = time.perf_counter()
        if not final and now - self.shown < PROGRESS_INTERVAL_S:
            return
        self.shown, elapsed, step = now, now - self.start, metrics["step"]
        eta = elapsed / max(step - self.first_step, 1) * (self.stop_step - step)
        logger.info(
            "step %d/%d (%d%%) loss %.4f lr %.2e %s tokens/s elapsed %s eta %s",
            step, self.stop_step, 100 * step // max(self.stop_step, 1), metrics["train_loss"], metrics["learning_rate"],
            f"{metrics['tokens_per_s']:,.0f}", _clock(elapsed), _clock(eta),
        )


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"


@dataclass
class Progress:
    """What a checkpoint carries beside the DeepSpeed state: the data position and every
    metric reported so far (so a resumed run keeps its curve)."""

    micro_batches_done: int = 0
    history: list[dict] = field(default_factory=list)
    # (step, seconds) of each finished checkpoint upload, put by Ray Train's upload thread.
    upload_seconds: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)

    def record(self, metrics: dict) -> None:
        self.history.append(_numbers(metrics))

    def add_upload_seconds(self) -> None:
        """Put the upload times finished so far into their steps' history rows."""
        rows = {row["step"]: row for row in self.history}
        while not self.upload_seconds.empty():
            step, seconds = self.upload_seconds.get()
            rows[step]["checkpoint_upload_s"] = seconds


def _numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def restore(engine) -> Progress:
    """Load the latest checkpoint Ray Train hands this worker, if any; where to continue."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return Progress()
    with checkpoint.as_directory() as directory:
        client_state, history = ckpt.load(engine, directory)
    logger.info("rank %d resumed at step %d", engine.global_rank, engine.global_steps)
    return Progress(client_state["micro_batches_done"], history)


class TensorBoard:
    """Rank 0's TensorBoard event file. For a directory in object storage the events are
    written locally and copied up at each checkpoint and at the end, since TensorBoard's
    writer only appends to local files."""

    def __init__(self, directory: str):
        from torch.utils.tensorboard import SummaryWriter

        self.directory = directory
        self.local = tempfile.mkdtemp(prefix="dolly_ray_tensorboard_") if storage.is_uri(directory) else directory
        self.writer = SummaryWriter(self.local)

    def add(self, metrics: dict, *, upload: bool) -> None:
        for key, value in _numbers(metrics).items():
            if key != "time":  # TensorBoard keeps its own wall time
                self.writer.add_scalar(key, value, metrics["step"])
        if upload:
            self.upload()

    def upload(self) -> None:
        self.writer.flush()
        if self.local != self.directory:
            storage.upload_dir(self.local, self.directory)

    def close(self) -> None:
        self.upload()
        self.writer.close()
        if self.local != self.directory:
            shutil.rmtree(self.local, ignore_errors=True)


def micro_batches(config: TrainConfig, rows: prepared.WorkerRows, pad_token_id: int, *, seed: int | None = None, skip: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """This worker's micro-batches of its ``rows``, shuffled by ``seed`` (training), from micro-batch ``skip`` on."""
    return batching.micro_batches(
        rows, config.batching, micro_batch_size=config.micro_batch_size, pad_token_id=pad_token_id, window_rows=config.shuffle_buffer_rows, seed=seed, skip=skip
    )


def optimizer_steps(config: TrainConfig, plan: StepPlan, rows: prepared.WorkerRows, epoch: int, done_in_epoch: int, pad_token_id: int) -> Iterator[list[dict]]:
    """The micro-batches of each optimizer step left in ``epoch``, from micro-batch
    ``done_in_epoch`` on (trained before a restore point, which is always a step
    boundary). Training data is reshuffled each epoch."""
    step_batches, position = [], done_in_epoch
    for batch in micro_batches(config, rows, pad_token_id, seed=config.seed + epoch, skip=done_in_epoch):
        step_batches.append(batch)
        position += 1
        if len(step_batches) == config.gradient_accumulation_steps:
            yield step_batches
            step_batches = []
        if position == plan.micro_batches_per_epoch:
            return
    raise RuntimeError(f"rank {dist.get_rank()}: epoch {epoch} ended after {position} micro-batches, planned {plan.micro_batches_per_epoch}")


@dataclass
class Window:
    """Sums over the optimizer steps since the last report, for its metrics."""

    loss_sum: float = 0.0  # token losses
    label_tokens: float = 0.0
    tokens: float = 0.0  # useful (non-padding) tokens
    start: float = field(default_factory=time.perf_counter)

    def metrics(self, engine, *, epoch: float) -> dict[str, Any]:
        loss_sum, label_tokens, tokens = all_reduce_sum(engine.device, self.loss_sum, self.label_tokens, self.tokens)
        metrics = {
            "step": engine.global_steps,
            "epoch": epoch,
            "train_loss": loss_sum / max(label_tokens, 1.0),  # per token, like eval_loss
            "learning_rate": engine.get_lr()[0],
            "tokens_per_s": tokens / (time.perf_counter() - self.start),
            "skipped_steps": engine.skipped_steps,  # not applied: an overflow or a non-finite gradient
            "time": time.time(),  # of the report: step times with whatever checkpoints cost in between
        }
        if engine.fp16_enabled():
            metrics["loss_scale"] = engine.optimizer.loss_scale
        return metrics


def train_step(engine, step_batches: list[dict], window: Window) -> None:
    """One optimizer step over its micro-batches, with the loss per label token of the
    whole step on all workers (``labels.loss_divisor``)."""
    local_tokens = sum(labels.label_tokens(batch["labels"]) for batch in step_batches)
    (step_tokens,) = all_reduce_sum(engine.device, local_tokens)
    divisor = labels.loss_divisor(step_tokens, dist.get_world_size(), len(step_batches))
    for batch in step_batches:
        window.tokens += int(batch.pop(batching.NUM_TOKENS))
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        loss = engine(**batch, use_cache=False, num_items_in_batch=divisor).loss
        engine.backward(loss)
        engine.step()
        window.loss_sum += loss.item() * divisor
    window.label_tokens += local_tokens


@torch.no_grad()
def evaluate(engine, config: TrainConfig, plan: StepPlan, rows: prepared.WorkerRows, pad_token_id: int) -> float | None:
    """Token-weighted mean loss over every worker's eval shard."""
    if plan.eval_batches == 0:
        return None
    engine.eval()
    loss_sum = tokens = 0.0
    for i, batch in enumerate(micro_batches(config, rows, pad_token_id)):
        if i == plan.eval_batches:
            break
        batch.pop(batching.NUM_TOKENS)
        n = float(labels.label_tokens(batch["labels"]))
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        loss_sum += float(engine(**batch, use_cache=False).loss) * n
        tokens += n
    engine.train()
    loss_sum, tokens = all_reduce_sum(engine.device, loss_sum, tokens)
    return loss_sum / max(tokens, 1.0)


@torch.no_grad()
def score_answers(engine, tokenizer, records: list[dict], max_new_tokens: int) -> dict[str, float]:
    """Greedy answers to the held-out ``records``, scored against their outputs (see
    ``scoring``) as ``eval_exact_match``, ``eval_rouge_l`` and ``eval_stopped_at_end``.

    Each rank answers its share, padded to the same count so every rank makes the same
    generate calls; transformers keeps ZeRO-3 ranks stepping together inside each call
    (``synced_gpus``) until the longest answer on any rank ends.
    """
    from dolly_ray.generate.generator import GenerationParams, InstructionGenerator

    if not records:
        return {}
    rank, world = dist.get_rank(), dist.get_world_size()
    share = records[rank::world]
    padded = share + [records[0]] * (math.ceil(len(records) / world) - len(share))
    results = InstructionGenerator(engine.module, tokenizer).generate(
        [{"instruction": r["instruction"], "input": r["input"]} for r in padded],
        GenerationParams(greedy=True, max_new_tokens=max_new_tokens),
        batch_size=ANSWER_BATCH_SIZE,
    )
    mine = [scoring.score(result.response, record["output"], result.finish_reason) for record, result in zip(share, results)]
    every = [None] * world
    dist.all_gather_object(every, mine)
    return {f"eval_{name}": value for name, value in scoring.means([s for part in every for s in part]).items()}


def final_metrics(engine, config: TrainConfig, plan: StepPlan, tokenizer, preset: str) -> dict[str, Any]:
    return {
        "finished": engine.global_steps >= plan.total_steps,
        "preset": preset,
        "param_partition_fractions": partition_fractions(engine),
        "worker_nodes": worker_nodes(),
        "samples": samples(engine, tokenizer, config.sample_prompts),
    }


def samples(engine, tokenizer, sample_prompts: list[dict]) -> list[dict]:
    """Greedy answers from the trained (still partitioned) weights.

    Every rank generates the same prompts greedily, so all take the same number of
    forward passes and the ZeRO-3 parameter gathers stay in step.
    """
    from dolly_ray.generate.generator import GenerationParams, InstructionGenerator

    if not sample_prompts:
        return []
    generator = InstructionGenerator(engine.module, tokenizer)
    results = generator.generate(sample_prompts, GenerationParams(greedy=True, max_new_tokens=64), batch_size=1)
    return [{**prompt, "response": r.response, "finish_reason": r.finish_reason} for prompt, r in zip(sample_prompts, results)]


def worker_nodes() -> list[str]:
    """The Ray node id of each rank, in rank order."""
    nodes = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    return nodes


def partition_fractions(engine) -> list[float]:
    """Each rank's share of the parameter elements it holds: about 1/world under ZeRO-3."""
    local = sum(p.ds_tensor.numel() for p in engine.module.parameters())
    total = sum(p.ds_numel for p in engine.module.parameters())
    shares = [0.0] * dist.get_world_size()
    shares[dist.get_rank()] = local / total
    return all_reduce_sum(engine.device, *shares)


def all_reduce_sum(device, *values: float) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def report_metrics(metrics: dict) -> None:
    ray.train.report(metrics)


def save_checkpoint(engine, tokenizer, metrics: dict, progress: Progress, config: TrainConfig, *, with_hf_model: bool) -> None:
    """Write this rank's part of a checkpoint and report it with the metrics (every rank
    calls it). The seconds spent saving and uploading are reported with the metrics and
    kept in the history (a checkpoint's own upload time reaches the history from the
    next checkpoint on)."""
    directory = tempfile.mkdtemp(prefix="dolly_ray_ckpt_")
    start = time.perf_counter()
    ckpt.save(engine, tokenizer, directory, client_state={"micro_batches_done": progress.micro_batches_done}, with_hf_model=with_hf_model)
    metrics["checkpoint_save_s"] = round(time.perf_counter() - start, 3)
    progress.record(metrics)
    if engine.global_rank == 0:
        progress.add_upload_seconds()
        ckpt.write_history(directory, progress.history)
    reported = dict(metrics)  # the upload thread adds its seconds to this copy
    ray.train.report(
        reported,
        checkpoint=ray.train.Checkpoint.from_directory(directory),
        checkpoint_upload_mode=ray.train.CheckpointUploadMode[config.checkpoint_upload.upper()],
        delete_local_checkpoint_after_upload=True,
        checkpoint_upload_fn=_timed_upload(reported, progress.upload_seconds),
    )


def _timed_upload(reported: dict, upload_seconds: queue.SimpleQueue):
    """Ray Train's own checkpoint upload, timed. Ray reports ``reported`` once the upload
    returns (at once with sync upload; in its upload thread with async)."""
    storage_context = ray.train.get_context().get_storage()

    def upload(checkpoint: ray.train.Checkpoint, name: str) -> ray.train.Checkpoint:
        start = time.perf_counter()
        persisted = storage_context.persist_current_checkpoint(checkpoint, name)
        reported["checkpoint_upload_s"] = seconds = round(time.perf_counter() - start, 3)
        upload_seconds.put((reported["step"], seconds))
        if ray.train.get_context().get_world_rank() == 0:
            logger.info("step %d checkpoint: saved in %.1f s, uploaded in %.1f s", reported["step"], reported["checkpoint_save_s"], seconds)
        return persisted

    return upload
