"""The local end-to-end demo: tiny GPT-J, project-made tasks, ZeRO-3 on 2 CPU workers.

Everything the real run does happens here on a small scale: the model and tokenizer
are loaded with ``from_pretrained`` from a directory, the records go through Ray Data,
training runs under Ray Train + DeepSpeed, and the answers come from the exported
Hugging Face checkpoint. The learning test calls the same function.

With ``--lora-r`` the demo first makes a base model that knows something, since LoRA
adapts what a model knows and a randomly initialised one knows nothing: the tiny model
is fully trained on other task kinds (``BASE_TASKS``), answers none of the demo's
tasks, and LoRA then teaches it those.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from dolly_ray import testing
from dolly_ray.generate import scoring
from dolly_ray.records import tasks
from dolly_ray.train import recipe

logger = logging.getLogger(__name__)

# What the LoRA demo's base model is fully trained on: letters copied and counted, digits
# sorted; none of the demo's default tasks.
BASE_TASKS = ["repeat_word", "uppercase", "count_letter", "sort_numbers"]


@dataclass
class DemoConfig:
    """Sizes calibrated so the tiny model learns the tasks in a few minutes on 2 cores (the seed study is in benchmarks/RESULTS.md)."""

    output_dir: str = field(default="demo_output", metadata={"help": "where the model, data and run go"})
    num_train: int = field(default=48000, metadata={"help": "training records"})
    num_heldout: int = field(default=100, metadata={"help": "held-out records scored by exact match"})
    tasks: list = field(default_factory=lambda: ["first_letter", "reverse_word", "last_letter"], metadata={"help": "task kinds (JSON list)"})
    n_layer: int = field(default=2, metadata={"help": "transformer layers of the tiny GPT-J"})
    n_embd: int = field(default=192, metadata={"help": "width of the tiny GPT-J"})
    epochs: int = field(default=1, metadata={"help": "passes over the training records"})
    batching: str = field(default="pad", metadata={"help": "pad, group or pack (see dolly_ray/train/batching.py)"})
    micro_batch_size: int = field(default=16, metadata={"help": "per worker per step: records (pad, group) or packed 256-token rows (pack)"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank (0: train every weight): first train a base on other tasks, then LoRA on these"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA scaling numerator (adapters add alpha / r x B A)"})
    lora_learning_rate: float = field(default=3e-3, metadata={"help": "peak learning rate of the LoRA run"})
    base_records: int = field(default=16000, metadata={"help": "with --lora-r: records of BASE_TASKS the base is trained on"})
    lora_records: int = field(default=24000, metadata={"help": "with --lora-r: training records of the LoRA run (instead of --num-train)"})
    num_workers: int = field(default=2, metadata={"help": "Ray Train workers (CPU)"})
    seed: int = field(default=0, metadata={"help": "seed for the model, the tasks and training"})
    restart: bool = field(default=False, metadata={"help": "train the demo's runs afresh, deleting earlier ones of the same seed and kind in --output-dir"})
    verbose: bool = field(default=False, metadata={"help": "show Ray's and the libraries' own INFO lines and known warnings on the console"})


def run(config: DemoConfig) -> dict:
    """Build, train, answer held-out tasks; return the training summary plus exact match."""
    out = Path(config.output_dir).resolve()
    model = testing.build_model(out / "base_model", n_layer=config.n_layer, n_embd=config.n_embd, n_positions=256, seed=config.seed)
    num_train = config.lora_records if config.lora_r else config.num_train
    train_records, heldout = tasks.train_and_heldout(num_train, config.num_heldout, seed=config.seed, tasks=config.tasks)
    dataset = tasks.write_jsonl(train_records, out / "data" / "train.jsonl")
    tasks.write_jsonl(heldout, out / "data" / "heldout.jsonl")
    if config.lora_r:
        base_records = tasks.generate(config.base_records, seed=config.seed + 1, tasks=BASE_TASKS)
        base_dataset = tasks.write_jsonl(base_records, out / "data" / "base.jsonl")
        model = recipe.run(_train_config(config, model, base_dataset, f"base-seed{config.seed}", heldout, learning_rate=config.learning_rate))["hf_model"]
        base_answers = _answer(model, heldout)
        before_lora = {"base_model": model, "base_exact_match": scoring.exact_match([a.response for a in base_answers], [r["output"] for r in heldout])}
        settings = dict(lora_r=config.lora_r, lora_alpha=config.lora_alpha, learning_rate=config.lora_learning_rate)
    else:
        before_lora, settings = {}, dict(learning_rate=config.learning_rate)
    name = f"demo-lora{config.lora_r}-seed{config.seed}" if config.lora_r else f"demo-seed{config.seed}"  # a run of its own for each
    summary = recipe.run(_train_config(config, model, dataset, name, heldout, **settings))
    summary.update(before_lora, dataset=str(dataset))
    results = _answer(summary["hf_model"], heldout)
    summary["exact_match"] = scoring.exact_match([r.response for r in results], [r["output"] for r in heldout])
    summary["stopped_at_end_key"] = sum(r.finish_reason == "stop" for r in results) / len(results)
    summary["heldout_examples"] = [
        {"task": r["task"], "instruction": r["instruction"], "input": r["input"], "expected": r["output"], "response": g.response, "finish_reason": g.finish_reason}
        for r, g in zip(heldout, results)
    ]
    return summary


def _train_config(config: DemoConfig, model, dataset: Path, name: str, heldout: list[dict], **settings) -> recipe.TrainConfig:
    """The demo's run of ``model`` on ``dataset``; ``settings`` add flags. The run's
    samples answer the first held-out records."""
    return recipe.TrainConfig(
        model=str(model),
        dataset=str(dataset),
        max_length=256,
        eval_fraction=0.02,
        epochs=config.epochs,
        warmup_steps=20,
        micro_batch_size=config.micro_batch_size,
        batching=config.batching,
        log_every=20,
        eval_every=400,  # evaluation costs time and changes no training number
        eval_generate=32,  # held-out answers scored at each evaluation: the curve's second panel
        eval_generate_max_new_tokens=24,
        checkpoint_every=0,
        num_workers=config.num_workers,
        cpus_per_worker=0.5,  # leaves a CPU for Ray Data on a 2-core machine
        preset="cpu",
        storage_path=str(Path(config.output_dir).resolve() / "runs"),
        name=name,
        seed=config.seed,
        sample_prompts=[{"instruction": r["instruction"], "input": r["input"]} for r in heldout[:4]],
        verbose=config.verbose,
        restart=config.restart,
        **settings,
    )


def _answer(model_dir: str, records: list[dict]) -> list:
    """Greedy answers of the exported model to ``records``."""
    from dolly_ray.generate.generator import GenerationParams, InstructionGenerator

    generator = InstructionGenerator.from_pretrained(model_dir)
    return generator.generate([{"instruction": r["instruction"], "input": r["input"]} for r in records], GenerationParams(greedy=True, max_new_tokens=24))


def report(summary: dict) -> tuple[list[str], dict]:
    """Lines for people (a few held-out answers, the exact match) and the summary without
    the per-example answers, for the job's output."""
    lines = []
    for example in summary["heldout_examples"][:8]:
        verdict = "ok " if example["response"] == example["expected"] else "MISS"
        lines.append(f"[{verdict}] {example['instruction']} {example['input']!r} -> {example['response']!r} (expected {example['expected']!r})")
    if "base_exact_match" in summary:
        lines.append(f"base model before LoRA: exact_match {summary['base_exact_match']:.2f}")
    lines.append(f"exact_match: {summary['exact_match']:.2f}")
    return lines, {key: value for key, value in summary.items() if key != "heldout_examples"}
