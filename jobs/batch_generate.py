"""Generate a response for every row of a dataset with Ray Data (see dolly_ray/batch.py).

    python jobs/batch_generate.py --model runs/gptj/model --input prompts.jsonl --output responses.jsonl
    ray job submit -- python jobs/batch_generate.py --model ... --num-actors 8 --num-gpus-per-actor 1

The last line printed is a JSON summary of the run.
"""

from __future__ import annotations

import argparse
import json

from dolly_ray import cli
from dolly_ray.batch import BatchConfig, run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cli.add_config_flags(parser, BatchConfig)
    config = cli.config_from_args(BatchConfig, parser.parse_args(argv))
    print(json.dumps(run(config)), flush=True)


if __name__ == "__main__":
    cli.run_main(main)
