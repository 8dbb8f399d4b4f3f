"""Instruction-tune a causal LM with Ray Train + DeepSpeed ZeRO-3.

    python jobs/train.py --model EleutherAI/gpt-j-6B --dataset tatsu-lab/alpaca --preset a10 --num-workers 8
    python jobs/train.py --dry-run --accelerator-type A10G --num-workers 4     # the memory and time plan only
    ray job submit --working-dir . -- python jobs/train.py --config run.yaml

The last line printed is a JSON summary: checkpoint, hf_model, train_loss, eval_loss, steps.
"""

import argparse

from dolly_ray import cli
from dolly_ray.train import recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_config_flags(parser, recipe.TrainConfig)
    cli.add_summary_flag(parser)
    args = parser.parse_args()
    cli.finish(recipe.run(cli.config_from_args(recipe.TrainConfig, args)), args.summary_file)


if __name__ == "__main__":
    cli.run_main(main)
