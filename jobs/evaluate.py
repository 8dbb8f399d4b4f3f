"""Score a checkpoint's greedy answers over a dataset with reference outputs (see dolly_ray/batch/evaluate.py).

    python jobs/evaluate.py --model runs/dolly/checkpoint_000010/hf --dataset heldout.jsonl
    ray job submit -- python jobs/evaluate.py --model s3://bucket/run/hf --dataset s3://bucket/eval.parquet --num-actors 4

Prints exact match, ROUGE-L and the share of answers that stopped at ### End, per task
and overall; the last line printed is the JSON summary. With --answers DIR, a job that
dies is rerun with the same command and answers only the records not yet written.
"""

from __future__ import annotations

import argparse

from dolly_ray import cli
from dolly_ray.batch.evaluate import EvalConfig, report_lines, run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cli.add_config_flags(parser, EvalConfig)
    cli.add_summary_flag(parser)
    args = parser.parse_args(argv)
    summary = run(cli.config_from_args(EvalConfig, args))
    cli.finish(summary, args.summary_file, report_lines(summary))


if __name__ == "__main__":
    cli.run_main(main)
