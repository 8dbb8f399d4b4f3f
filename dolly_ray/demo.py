"""The local end-to-end demo: tiny GPT-J, project-made tasks, ZeRO-3 on 2 CPU workers.

Everything the real run does happens here on a small scale: the model and tokenizer
are loaded with ``from_pretrained`` from a directory, the records go through Ray Data,
training runs under Ray Train + DeepSpeed, and the answers come from the exported
Hugging Face checkpoint. The learning test calls the same function.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from dolly_ray import scoring, tasks, testing, train

logger = logging.getLogger(__name__)


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
    batching: str = field(default="pad", metadata={"help": "pad, group or pack (see dolly_ray/batching.py)"})
    micro_batch_size: int = field(default=16, metadata={"help": "per worker per step: records (pad, group) or packed 256-token rows (pack)"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    num_workers: int = field(default=2, metadata={"help": "Ray Train workers (CPU)"})
    seed: int = field(default=0, metadata={"help": "seed for the model, the tasks and training"})


def run(config: DemoConfig) -> dict:
    """Build, train, answer held-out tasks; return the training summary plus exact match."""
    from dolly_ray.generation import GenerationParams, InstructionGenerator

    out = Path(config.output_dir).resolve()
    base_model = testing.build_model(out / "base_model", n_layer=config.n_layer, n_embd=config.n_embd, n_positions=256, seed=config.seed)
    train_records, heldout = tasks.train_and_heldout(config.num_train, config.num_heldout, seed=config.seed, tasks=config.tasks)
    dataset = tasks.write_jsonl(train_records, out / "data" / "train.jsonl")
    tasks.write_jsonl(heldout, out / "data" / "heldout.jsonl")
    summary = train.run(
        train.TrainConfig(
            model=str(base_model),
            dataset=str(dataset),
            max_length=256,
            eval_fraction=0.02,
            epochs=config.epochs,
            learning_rate=config.learning_rate,
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
            storage_path=str(out / "runs"),
            name="demo",
            seed=config.seed,
            sample_prompts=[{"instruction": r["instruction"], "input": r["input"]} for r in heldout[:4]],
        )
    )
    summary["dataset"] = str(dataset)
    generator = InstructionGenerator.from_pretrained(summary["hf_model"])
    results = generator.generate(
        [{"instruction": r["instruction"], "input": r["input"]} for r in heldout], GenerationParams(greedy=True, max_new_tokens=24)
    )
    summary["exact_match"] = scoring.exact_match([r.response for r in results], [r["output"] for r in heldout])
    summary["stopped_at_end_key"] = sum(r.finish_reason == "stop" for r in results) / len(results)
    summary["heldout_examples"] = [
        {"task": r["task"], "instruction": r["instruction"], "input": r["input"], "expected": r["output"], "response": g.response, "finish_reason": g.finish_reason}
        for r, g in zip(heldout, results)
    ]
    return summary


def report(summary: dict) -> tuple[list[str], dict]:
    """Lines for people (a few held-out answers, the exact match) and the summary without
    the per-example answers, for the job's output."""
    lines = []
    for example in summary["heldout_examples"][:8]:
        verdict = "ok " if example["response"] == example["expected"] else "MISS"
        lines.append(f"[{verdict}] {example['instruction']} {example['input']!r} -> {example['response']!r} (expected {example['expected']!r})")
    lines.append(f"exact_match: {summary['exact_match']:.2f}")
    return lines, {key: value for key, value in summary.items() if key != "heldout_examples"}
