"""Serve a checkpoint over HTTP with Ray Serve: /generate and an OpenAI-compatible /v1 API.

    python jobs/serve.py --model runs/gptj-alpaca/checkpoint_000010/hf
    python jobs/serve.py --model ... --num-gpus-per-replica 1 --num-replicas 2 --max-batch-size 32
    python jobs/serve.py --config serve.yaml --port 8080

Binds 127.0.0.1:8000 unless told otherwise and runs until Ctrl-C. For a cluster, see
serve_config.yaml (``serve run serve_config.yaml`` / ``serve deploy serve_config.yaml``).
"""

from __future__ import annotations

import argparse

from dolly_ray import cli
from dolly_ray.serve.config import ServeConfig
from dolly_ray.serve.server import run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 opens it to the network (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    cli.add_config_flags(parser, ServeConfig)
    args = parser.parse_args(argv)
    run(cli.config_from_args(ServeConfig, args), host=args.host, port=args.port)


if __name__ == "__main__":
    cli.run_main(main)
