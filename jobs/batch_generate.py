"""Generate a response for every row of a dataset with Ray Data (see dolly_ray/batch.py).

    python jobs/batch_generate.py --model runs/gptj/model --input prompts.jsonl --output responses.jsonl
    ray job submit -- python jobs/batch_generate.py --model ... --num-actors 8 --num-gpus-per-actor 1

The last line printed is a JSON summary of the run.
"""

from __future__ import annotations

import argparse
import json
import sys

from dolly_ray.batch import BatchConfig, BatchError, run
from dolly_ray.data import DataError


def parse_args(argv: list[str] | None = None) -> BatchConfig:
    defaults = BatchConfig(model="", input="", output="")
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", required=True, help="checkpoint directory or Hugging Face model id")
    p.add_argument("--input", required=True, help="JSON/JSONL/Parquet file or directory, a datasets dir, or a hub dataset id")
    p.add_argument("--output", required=True, help="output file; .jsonl or .parquet picks the format")
    p.add_argument(
        "--output-format", choices=["jsonl", "parquet"], default=defaults.output_format, help="overrides the output's extension"
    )
    p.add_argument("--columns", default=defaults.columns, help="schema name (alpaca, dolly) or instruction=A,input=B")
    p.add_argument("--split", default=defaults.split, help="split of a Hugging Face dataset")
    p.add_argument("--num-actors", type=int, default=defaults.num_actors, help="generation actors, each holding one model")
    p.add_argument(
        "--num-gpus-per-actor", type=float, default=defaults.num_gpus_per_actor, help="None: 1 when the cluster has GPUs, else 0"
    )
    p.add_argument("--num-cpus-per-actor", type=float, default=defaults.num_cpus_per_actor, help="fractions allowed")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="prompts per model.generate call")
    p.add_argument(
        "--max-batch-tokens", type=int, default=defaults.max_batch_tokens, help="also cap rows x padded length per generate call"
    )
    p.add_argument(
        "--rows-per-call",
        type=int,
        default=defaults.rows_per_call,
        help="rows per actor call, length-sorted within it; None: 4 x batch size",
    )
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="longest response, in tokens")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--temperature", type=float, default=defaults.temperature, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=defaults.top_p, help="nucleus sampling threshold")
    p.add_argument("--top-k", type=int, default=defaults.top_k, help="0 turns top-k off")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed for sampling")
    p.add_argument("--trust-remote-code", action="store_true", help="run model code from the hub (only for models you trust)")
    p.add_argument("--allow-pickle", action="store_true", help="allow non-safetensors weights (pickle can run code)")
    return BatchConfig(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        summary = run(config)
    except (BatchError, DataError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, no traceback
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
