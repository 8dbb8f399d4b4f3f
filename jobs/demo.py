"""The local end-to-end demo: tiny GPT-J, project-made tasks, ZeRO-3 on 2 CPU workers, held-out answers.

    python jobs/demo.py --output-dir demo_output

Starts a local Ray (or joins RAY_ADDRESS), needs no downloads, and takes a few minutes
on 2 cores. Prints sample answers, `exact_match: 0.NN`, then the run summary as JSON.
"""

import argparse

from dolly_ray import cli, demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_config_flags(parser, demo.DemoConfig)
    cli.add_summary_flag(parser)
    args = parser.parse_args()
    lines, summary = demo.report(demo.run(cli.config_from_args(demo.DemoConfig, args)))
    cli.finish(summary, args.summary_file, lines)


if __name__ == "__main__":
    cli.run_main(main)
