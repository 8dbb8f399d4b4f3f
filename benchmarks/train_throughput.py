"""Training throughput of the three batching strategies: pad (Dolly's), group and pack.

The records of ``--data`` (Alpaca-style JSON) go through the training code paths
(``dolly_ray.train.data`` validation and Dolly-prompt tokenization, ``dolly_ray.train.batching``
collators and packing) and become one epoch of micro-batches per strategy. Each
strategy then trains on the same number of useful (non-padding) tokens, one
optimizer step per micro-batch, and reports:

- useful tokens/s: real tokens trained per second (padding excluded);
- useful fraction: real tokens / computed tokens over the whole epoch;
- MFU: useful FLOPs per second / ``--peak-tflops``. Useful FLOPs per token are 6N
  (N: parameters except the input embedding) plus causal attention within each
  record, 6 * n_layer * n_embd * (n + 1) per token of an n-token record: padding,
  and packed records attending to nothing of each other, earn nothing.

Engines: ``torch`` (the default on CPU) is a plain fp32 AdamW step of the same model;
``deepspeed`` (the default on a GPU) is the training run's engine, a ZeRO-3 DeepSpeed
engine from ``dolly_ray.train.deepspeed_config`` (preset a100, bf16, on one GPU; preset cpu
on a CPU). ``--gptj-6b`` uses GPT-J-6B's shape (``GPTJConfig()`` defaults), randomly
initialised on the device: nothing is downloaded.

    python benchmarks/train_throughput.py                       # tiny GPT-J on CPU, a few minutes
    python benchmarks/train_throughput.py --gptj-6b --gradient-checkpointing   # on a GPU

The last line printed is JSON with every figure and the pack/pad ratio of useful tokens/s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import torch

from dolly_ray import prompts, testing
from dolly_ray.records import sources
from dolly_ray.train import batching, data, labels, memory_plan
from dolly_ray.train.config import StepPlan, TrainConfig
from dolly_ray.train.engine import build_engine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(REPO, "..", "shared", "data", "alpaca_eval_davinci003.json")


def tokenized_records(path: str, tokenizer, max_length: int) -> dict[str, np.ndarray]:
    """The records as training rows, through the same validation and tokenization as training."""
    with open(path) as f:
        checked = [sources.validate_record(record, sources.parse_columns("alpaca")) for record in json.load(f)]
    valid = [record for record in checked if not record["skip_reason"]]
    rows = [row for row in data.tokenize_records(valid, tokenizer, max_length) if not row.too_long]
    if not rows:
        raise SystemExit(f"no usable records in {path}")
    return {
        "input_ids": _objects([np.asarray(row.input_ids, np.int32) for row in rows]),
        "labels": _objects([np.asarray(row.labels, np.int32) for row in rows]),
        "num_tokens": np.array([row.num_tokens for row in rows]),
    }


def _objects(values: list) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def epoch_of_micro_batches(strategy: str, records: dict, *, micro_batch_size: int, pack_rows: int, max_length: int, tokenizer, seed: int):
    """One shuffled epoch of one strategy's micro-batches, as a training worker gets them,
    each with the lengths of the records inside it."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(records["num_tokens"]))
    shuffled = {name: values[order] for name, values in records.items()}
    if strategy == "pack":
        records_table = pa.table(
            {
                "input_ids": pa.array(list(shuffled["input_ids"]), pa.list_(pa.int32())),
                "loss_mask": pa.array([row != labels.IGNORE_INDEX for row in shuffled["labels"]], pa.list_(pa.bool_())),
                "num_tokens": pa.array(shuffled["num_tokens"], pa.int32()),
            }
        )
        rows = batching.numpy_rows(batching.pack(records_table, max_length))
        collate = batching.PackedRowsCollator(tokenizer.pad_token_id)
        perm = rng.permutation(len(rows["num_tokens"]))
        groups = [perm[i : i + pack_rows] for i in range(0, len(perm), pack_rows)]
        return [(collate({name: values[g] for name, values in rows.items()}), [int(n) for row in rows["lengths"][g] for n in row]) for g in groups]
    collate = batching.PaddedRecordsCollator(tokenizer.pad_token_id)
    if strategy == "group":
        window = math.ceil(TrainConfig(preset="cpu").shuffle_buffer_rows / micro_batch_size) * micro_batch_size  # a worker's window
        groups = [start + g for start in range(0, len(order), window) for g in batching.length_groups(shuffled["num_tokens"][start : start + window], micro_batch_size, rng)]
    else:
        groups = [np.arange(i, min(i + micro_batch_size, len(order))) for i in range(0, len(order), micro_batch_size)]
    return [(collate({name: shuffled[name][g] for name in ("input_ids", "labels")}), shuffled["num_tokens"][g].tolist()) for g in groups]


def build_model(args, vocab_size: int, eos_token_id: int):
    from transformers import GPTJConfig

    if args.gptj_6b:
        config = GPTJConfig()  # GPT-J-6B's shape: 28 layers, 4096 wide, 16 heads, rotary 64
    else:
        config = GPTJConfig(vocab_size=vocab_size, n_positions=args.max_length, n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_embd // 64, rotary_dim=32)
    config.vocab_size = max(config.vocab_size, vocab_size)
    config.bos_token_id = config.eos_token_id = eos_token_id
    config.use_cache = False
    return config


class TorchStep:
    """A plain fp32 AdamW training step."""

    def __init__(self, config, device, gradient_checkpointing: bool):
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device).train()
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.device = device

    def __call__(self, batch: dict) -> float:
        loss = self.model(**{k: v.to(self.device) for k, v in batch.items()}, use_cache=False).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


class DeepSpeedStep:
    """The training run's engine (``dolly_ray.train.engine.build_engine``): DeepSpeed ZeRO-3 from a project
    preset (a100 on a GPU, cpu on a CPU), world size 1, randomly initialised."""

    def __init__(self, config, device, gradient_checkpointing: bool, micro_batch_size: int, tokenizer_dir: str):
        for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29561", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
            os.environ.setdefault(key, value)
        run = TrainConfig(
            model=tokenizer_dir, preset="a100" if device.type == "cuda" else "cpu", num_workers=1, micro_batch_size=micro_batch_size,
            gradient_checkpointing=gradient_checkpointing, learning_rate=1e-5, warmup_steps=1, seed=0, batching="pad",
        )
        plan = StepPlan(micro_batches_per_epoch=1, total_steps=1_000_000, eval_batches=0)
        self.engine, _, self.preset = build_engine(run, plan, world_size=1, model_config=config)
        self.parameters = sum(p.ds_numel for p in self.engine.module.parameters())

    def __call__(self, batch: dict) -> float:
        loss = self.engine(**{k: v.to(self.engine.device) for k, v in batch.items()}, use_cache=False).loss
        self.engine.backward(loss)
        self.engine.step()
        return loss.item()


def measure_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Best of a few large matmuls: the achievable dense peak of this device, in TFLOP/s."""
    n = 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="Alpaca-style JSON records (default: the shared alpaca_eval file)")
    parser.add_argument("--tokenizer", help="tokenizer directory or hub id (default: a byte-level BPE built here from the records)")
    parser.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of the locally built tokenizer")
    parser.add_argument("--max-length", type=int, default=1024, help="longest record, and the packed row length")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="records per micro-batch for pad and group")
    parser.add_argument("--pack-rows", type=int, help="packed rows of --max-length tokens per pack micro-batch (default: --micro-batch-size, as in training)")
    parser.add_argument("--tokens", type=int, default=32000, help="useful tokens each strategy trains on (timed)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps before timing")
    parser.add_argument("--strategies", default="pad,group,pack", help="comma-separated batching strategies")
    parser.add_argument("--n-layer", type=int, default=4, help="layers of the tiny model")
    parser.add_argument("--n-embd", type=int, default=256, help="width of the tiny model (heads of 64)")
    parser.add_argument("--gptj-6b", action="store_true", help="GPT-J-6B's shape, randomly initialised (for a GPU)")
    parser.add_argument("--engine", choices=("torch", "deepspeed"), help="training step (default: deepspeed on GPU, torch on CPU)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--peak-tflops", type=float, help="device peak for MFU in TFLOP/s (default: 989 on CUDA, bf16 H100/H200; on CPU a measured fp32 matmul)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="the smallest sizes, so CI checks the script still runs (its figures mean nothing)")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(tokens=1024, warmup_steps=1, n_layer=1, n_embd=64, max_length=128, vocab_size=600, micro_batch_size=2)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.pack_rows = args.pack_rows or args.micro_batch_size
    engine = args.engine or ("deepspeed" if device.type == "cuda" else "torch")

    tokenizer_dir = args.tokenizer
    if tokenizer_dir is None:
        with open(args.data) as f:
            corpus = testing.english_corpus(json.load(f))
        tokenizer_dir = tempfile.mkdtemp(prefix="dolly_ray_tokenizer_")
        testing.build_tokenizer(tokenizer_dir, vocab_size=args.vocab_size, corpus=corpus)
    tok = prompts.load_tokenizer(tokenizer_dir)
    records = tokenized_records(args.data, tok, args.max_length)
    config = build_model(args, len(tok), tok.eos_token_id)
    if engine == "deepspeed":
        shape = memory_plan.ModelShape.from_config(config)  # before the engine: its ZeRO-3 setting changes how models are built
        step = DeepSpeedStep(config, device, args.gradient_checkpointing, args.micro_batch_size, tokenizer_dir)
        n_params = step.parameters
    else:
        step = TorchStep(config, device, args.gradient_checkpointing)
        n_params = sum(p.numel() for p in step.model.parameters())
    n_compute = n_params - config.vocab_size * config.n_embd  # the input embedding is a lookup
    peak = args.peak_tflops or (989.0 if device.type == "cuda" else measure_peak_tflops(device, torch.float32))

    results = {}
    for strategy in args.strategies.split(","):
        batches = epoch_of_micro_batches(
            strategy, records, micro_batch_size=args.micro_batch_size, pack_rows=args.pack_rows,
            max_length=args.max_length, tokenizer=tok, seed=args.seed,
        )
        useful_all = sum(int(b.pop(batching.NUM_TOKENS)) for b, _ in batches)
        computed_all = sum(b["input_ids"].numel() for b, _ in batches)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for batch, _ in batches[: args.warmup_steps]:
            step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        useful = flops = 0
        timed = 0
        start = time.perf_counter()
        for batch, lengths in batches[args.warmup_steps :] * 2:  # wraps round when --tokens exceeds an epoch
            step(batch)
            timed += 1
            useful += sum(lengths)
            flops += 6 * n_compute * sum(lengths) + 6 * config.n_layer * config.n_embd * sum(n * (n + 1) for n in lengths)
            if useful >= args.tokens:
                break
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        results[strategy] = {
            "useful_tokens_per_s": useful / seconds,
            "useful_fraction": useful_all / computed_all,
            "mfu": flops / seconds / (peak * 1e12),
            "micro_batches_per_epoch": len(batches),
            "timed_micro_batches": timed,
            "timed_useful_tokens": useful,
            "seconds": seconds,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        }
        if engine == "deepspeed":  # what the training run's memory plan predicts for this micro-batch
            rows = args.pack_rows if strategy == "pack" else args.micro_batch_size
            planned = memory_plan.plan(
                shape, preset=step.preset, workers=1, micro_batch_size=rows,
                max_length=args.max_length, gradient_checkpointing=args.gradient_checkpointing,
            )  # fmt: skip
            results[strategy]["planned_gib"] = planned.per_gpu_gib

    print(f"{'strategy':<9}{'useful tok/s':>14}{'useful frac':>13}{'MFU':>9}{'mb/epoch':>10}{'timed mb':>10}{'seconds':>9}{'peak GiB':>10}{'plan GiB':>10}")
    for strategy, r in results.items():
        peak_gib = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        plan_gib = f"{r['planned_gib']['total']:.1f}" if "planned_gib" in r else "-"
        print(f"{strategy:<9}{r['useful_tokens_per_s']:>14.1f}{r['useful_fraction']:>13.3f}{r['mfu']:>9.2%}{r['micro_batches_per_epoch']:>10}{r['timed_micro_batches']:>10}{r['seconds']:>9.1f}{peak_gib:>10}{plan_gib:>10}")
    lengths = records["num_tokens"]
    summary = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "engine": engine,
        "model": "gpt-j-6b shape" if args.gptj_6b else f"gpt-j n_layer={args.n_layer} n_embd={args.n_embd}",
        "parameters": n_params,
        "peak_tflops": peak,
        "records": len(lengths),
        "record_tokens": {"median": float(np.median(lengths)), "mean": float(lengths.mean()), "max": int(lengths.max())},
        "max_length": args.max_length,
        "micro_batch_size": args.micro_batch_size,
        "pack_rows": args.pack_rows,
        "results": results,
    }
    if "pack" in results and "pad" in results:
        summary["pack_over_pad_useful_tokens_per_s"] = results["pack"]["useful_tokens_per_s"] / results["pad"]["useful_tokens_per_s"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
