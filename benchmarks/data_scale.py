"""Training input at scale: preparation speed, time to the first step and memory, by dataset size.

For each size, Alpaca-like records are made here (instructions, inputs and outputs of the
AlpacaEval records in ``--data`` recombined at random; nothing is downloaded) and written
as one JSONL file. A tiny GPT-J (with a byte-level BPE tokenizer trained on those
records, which spends about as many tokens on English as GPT-J's) then trains
``--max-steps`` steps on 2 CPU workers of an embedded local Ray, twice: the first run
prepares the data (``dolly_ray.train.prepared``), the rerun (another run name, same data
and settings) reuses it. Per size it prints:

- preparation records/s (the first run's Ray Data pass: read, validate, tokenize, split,
  pack, write), beside the raw fast tokenizer's records/s on the same records' Dolly
  texts and the same cores (batches of 1,000 in this process; the ratio is measured in
  the same run);
- seconds from the job's start to its first optimizer step, first run and rerun;
- peak machine memory over idle (MemTotal - MemAvailable, sampled every 0.25 s), the
  peak object-store use, and the driver's peak RSS.

    python benchmarks/data_scale.py                      # 20K, 100K, 400K and 1M records: about 30 minutes on 2 cores
    python benchmarks/data_scale.py --sizes 20000 400000

The last line printed is JSON with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import tempfile
import threading
import time

from dolly_ray import cluster, prompts, testing
from dolly_ray.train import checkpoint, recipe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(REPO, "..", "shared", "data", "alpaca_eval_davinci003.json")
RAW_SAMPLE = 20_000  # records the raw tokenizer's speed is measured on


def write_records(base: list[dict], n: int, path: str, seed: int) -> None:
    """``n`` Alpaca-like records: an instruction, an input 40% of the time and an
    output, each from a random record of ``base``; sometimes two outputs, for Alpaca's
    longer answers."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            output = rng.choice(base)["output"]
            if rng.random() < 0.3:
                output += "\n\n" + rng.choice(base)["output"]
            record = {"instruction": rng.choice(base)["instruction"], "input": rng.choice(base)["instruction"] if rng.random() < 0.4 else "", "output": output}
            f.write(json.dumps(record) + "\n")


def raw_tokenizer_speed(path: str, model: str) -> tuple[float, float]:
    """(records/s, median tokens) of the fast tokenizer alone on the first records' Dolly texts."""
    tokenizer = prompts.load_tokenizer(model)
    with open(path) as f:
        records = [json.loads(line) for line, _ in zip(f, range(RAW_SAMPLE))]
    texts = [prompts.format_training_text(r["instruction"], r["output"], r["input"]) for r in records]
    start = time.perf_counter()
    lengths = [len(ids) for i in range(0, len(texts), 1000) for ids in tokenizer(texts[i : i + 1000])["input_ids"]]
    return len(texts) / (time.perf_counter() - start), sorted(lengths)[len(lengths) // 2]


class MemorySampler:
    """Peak machine memory in use and peak object-store use, sampled in a thread."""

    def __init__(self):
        self.idle = self.used()
        self.peak_used = self.peak_store = 0
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    @staticmethod
    def used() -> int:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemTotal"] - info["MemAvailable"]

    @staticmethod
    def object_store_used() -> int:
        from ray._private.internal_api import memory_summary

        match = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(stats_only=True))
        return int(match.group(1)) << 20 if match else 0

    def _sample(self) -> None:
        while self.running:
            self.peak_used = max(self.peak_used, self.used())
            try:
                self.peak_store = max(self.peak_store, self.object_store_used())
            except Exception:  # Ray between runs
                pass
            time.sleep(0.25)

    def stop(self) -> dict:
        self.running = False
        self.thread.join()
        return {"peak_memory_over_idle_gb": round((self.peak_used - self.idle) / 2**30, 2), "peak_object_store_mb": round(self.peak_store / 2**20)}


def one_run(model: str, dataset: str, storage: str, name: str, args) -> dict:
    """One training run of ``--max-steps`` steps: its seconds to the first step, what
    preparing its data cost, and the memory it took."""
    config = testing.cpu_train_config(model, dataset, storage, name, max_steps=args.max_steps, max_length=args.max_length, micro_batch_size=4, log_every=1, eval_fraction=0.02)
    sampler = MemorySampler()
    start = time.time()
    summary = recipe.run(config)
    memory = sampler.stop()
    first_step = checkpoint.read_history(summary["checkpoint"])[0]["time"]
    prepared = summary["prepared_data"]
    return {"first_step_s": round(first_step - start, 1), "reused": prepared["reused"], "prepare_s": prepared["seconds"], **memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000, 400_000, 1_000_000], help="records per dataset (default: 20000 100000 400000 1000000)")
    parser.add_argument("--data", default=DEFAULT_DATA, help="AlpacaEval-style JSON records to recombine (default: the shared alpaca_eval file)")
    parser.add_argument("--max-steps", type=int, default=2, help="optimizer steps per run (default: 2)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per packed row (default: 512)")
    parser.add_argument("--smoke", action="store_true", help="the smallest sizes, so CI checks the script still runs (its figures mean nothing)")
    args = parser.parse_args()
    if args.smoke:
        args.sizes = [2_000]
    with open(args.data) as f:
        base = json.load(f)
    work = tempfile.mkdtemp(prefix="dolly_ray_data_scale_")
    model = str(testing.build_model(os.path.join(work, "model"), n_positions=args.max_length, tokenizer_corpus=testing.english_corpus(base), tokenizer_vocab_size=4096, vocab_size=4200))
    cluster.init_ray()
    results = []
    for size in args.sizes:
        dataset = os.path.join(work, f"records_{size}.jsonl")
        write_records(base, size, dataset, seed=size)
        raw, median_tokens = raw_tokenizer_speed(dataset, model)
        storage = os.path.join(work, f"runs_{size}")
        first, rerun = one_run(model, dataset, storage, "first", args), one_run(model, dataset, storage, "rerun", args)
        row = {
            "records": size,
            "jsonl_mb": round(os.path.getsize(dataset) / 2**20),
            "median_tokens": median_tokens,
            "prepare_records_per_s": round(size / first["prepare_s"]),
            "raw_tokenizer_records_per_s": round(raw),
            "prepare_vs_raw": round(size / first["prepare_s"] / raw, 2),
            "first": first,
            "rerun": rerun,
            "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        }
        results.append(row)
        print(
            f"{size:>9,} records: prepared at {row['prepare_records_per_s']:,}/s ({row['prepare_vs_raw']:.0%} of the raw tokenizer's "
            f"{row['raw_tokenizer_records_per_s']:,}/s); first step after {first['first_step_s']} s, {rerun['first_step_s']} s on the rerun; "
            f"peak memory +{first['peak_memory_over_idle_gb']} GB, object store {first['peak_object_store_mb']} MB",
            flush=True,
        )
        os.remove(dataset)
    smallest, largest = results[0], results[-1]
    summary = {
        "sizes": results,
        "memory_ratio_largest_to_smallest": round(largest["first"]["peak_memory_over_idle_gb"] / max(smallest["first"]["peak_memory_over_idle_gb"], 0.01), 2),
        "slowest_rerun_first_step_s": max(row["rerun"]["first_step_s"] for row in results),
        "lowest_prepare_vs_raw": min(row["prepare_vs_raw"] for row in results),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
