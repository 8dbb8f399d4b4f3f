"""The local end-to-end demo: tiny GPT-J, project-made tasks, ZeRO-3 on 2 CPU workers, held-out answers.

    python jobs/demo.py --output-dir demo_output

Starts a local Ray (or joins RAY_ADDRESS), needs no downloads, and takes a few minutes
on 2 cores. Prints sample answers, the run summary as JSON, then `exact_match: 0.NN`.
"""

import argparse
import json

from dolly_ray import cli, demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_config_flags(parser, demo.DemoConfig)
    config = cli.config_from_args(demo.DemoConfig, parser.parse_args())
    cli.init_ray()
    summary = demo.run(config)
    examples = summary.pop("heldout_examples")
    for example in examples[:8]:
        verdict = "ok " if example["response"] == example["expected"] else "MISS"
        print(f"[{verdict}] {example['instruction']} {example['input']!r} -> {example['response']!r} (expected {example['expected']!r})")
    print(json.dumps(summary))
    print(f"exact_match: {summary['exact_match']:.2f}", flush=True)


if __name__ == "__main__":
    cli.run_main(main)
