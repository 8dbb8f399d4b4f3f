"""Generate a response for every row of a dataset with Ray Data (see dolly_ray/batch/generation.py).

    python jobs/batch_generate.py --model runs/gptj/model --input prompts.jsonl --output responses/
    ray job submit -- python jobs/batch_generate.py --model ... --num-actors 8 --num-gpus-per-actor 1

The output is a directory of part files in input order. A job that dies is rerun with
the same command: it keeps the rows already written and answers only the others. The
last line printed is a JSON summary of the run.
"""

from __future__ import annotations

import argparse

from dolly_ray import cli
from dolly_ray.batch.config import BatchConfig
from dolly_ray.batch.generation import run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cli.add_config_flags(parser, BatchConfig)
    cli.add_summary_flag(parser)
    args = parser.parse_args(argv)
    cli.finish(run(cli.config_from_args(BatchConfig, args)), args.summary_file)


if __name__ == "__main__":
    cli.run_main(main)
