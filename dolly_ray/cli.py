"""What every entry point in jobs/ shares: config flags from dataclasses, YAML, errors, Ray.

Flags are generated from the config dataclass, so a new config field is a new flag
with its help and default, and ``--help`` can never drift from the code.
Precedence: dataclass defaults < ``--config`` YAML < explicit flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import sys
import warnings
from typing import Any, Callable, Sequence

_SCALAR_TYPES = {"int": int, "float": float, "str": str}
# Lines that dependencies print on every run and that say nothing about it, by the logger
# that prints them: hidden unless --verbose.
KNOWN_NOISE = {
    # DeepSpeed on a machine without GPUs (the cpu preset), and its scheduler read before the first step.
    "DeepSpeed": ("Setting accelerator to CPU", "Attempting to get learning rate from scheduler before it has started"),
    # A greedy call on a checkpoint whose generation config samples (Dolly's defaults).
    "transformers.generation.configuration_utils": ("The following generation flags are not valid",),
    # Off a terminal the bars are off on purpose (cluster.init_ray).
    "ray.data._internal.progress": ("Progress bars disabled",),
}
# torch's deprecation of the collectives DeepSpeed calls, once per call site and worker.
KNOWN_WARNINGS = ((FutureWarning, r"`torch\.distributed\.\w+` is deprecated"),)
# Loggers that narrate each step of a library's work at INFO (Ray Data: every execution, twice).
CHATTY_LOGGERS = ("ray.data",)


class ConfigError(ValueError):
    """A job that cannot start as configured: a bad flag, YAML file or value, or a model
    or input that is not there; jobs print it as one line."""


def option(default, help: str):
    """A config dataclass field with the help text its command-line flag shows."""
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def add_config_flags(parser: argparse.ArgumentParser, config_class: type) -> None:
    """One ``--flag-name`` per dataclass field, defaulting to None so YAML can fill it."""
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file with any of the options below (flags win)")
    for f in dataclasses.fields(config_class):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = "required" if default is dataclasses.MISSING else f"default: {json.dumps(default)}"
        help_text = f"{f.metadata.get('help', '')} ({shown})"
        flag = "--" + f.name.replace("_", "-")
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))  # str(float | None) is 'float | None'
        kind = kind.removesuffix(" | None")  # optional values: the flag is simply not given
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif kind in ("dict", "list"):
            parser.add_argument(flag, type=_json_of(kind), default=None, metavar="JSON", help=help_text)
        else:
            parser.add_argument(flag, type=_SCALAR_TYPES[kind], default=None, help=help_text)


def _json_of(kind: str) -> Callable[[str], Any]:
    def parse(text: str):
        value = json.loads(text)
        if type(value).__name__ != kind:
            raise ValueError(f"expected a JSON {kind}")
        return value

    parse.__name__ = f"JSON {kind}"
    return parse


def config_from_args(config_class: type, args: argparse.Namespace):
    """The config: defaults, then the YAML file, then the flags given on the command line."""
    values: dict[str, Any] = {}
    if args.config:
        values.update(load_yaml(args.config))
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{args.config}: unknown option(s) {unknown}")
    values.update({name: getattr(args, name) for name in known if getattr(args, name) is not None})
    required = [f.name for f in dataclasses.fields(config_class) if f.default is f.default_factory is dataclasses.MISSING]
    missing = ["--" + name.replace("_", "-") for name in required if name not in values]
    if missing:
        raise ConfigError(f"{', '.join(missing)} required")
    try:
        return config_class(**values)
    except TypeError as e:
        raise ConfigError(str(e)) from None


def load_yaml(path: str) -> dict:
    import yaml

    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of option: value, not a {type(values).__name__}")
    return {key.replace("-", "_"): value for key, value in values.items()}


def check_at_least(config, minimum: float, *names: str) -> None:
    """Refuse a numeric option below ``minimum``, naming its flag and value; None is unset."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < minimum:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least {minimum:g}, got {value}")


def add_summary_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--summary-file", metavar="PATH", help="also write the JSON summary to this file, a local path or URI such as s3://bucket/run.json (default: none)")


def finish(summary: dict, summary_file: str | None = None, lines: Sequence[str] = ()) -> None:
    """End a job: ``lines`` for people, then the JSON summary as the last line of stdout
    (and into ``summary_file``, local or a URI).

    Ray stops streaming worker output first, so nothing from the run comes after the
    summary in a combined log (``ray job logs``, ``2>&1``), and a newline on stderr ends
    any line a log left unfinished, so the summary stands on a line of its own.
    """
    import ray

    from dolly_ray import storage

    text = json.dumps(summary)
    if ray.is_initialized():
        ray.shutdown()
    sys.stderr.write("\n")
    sys.stderr.flush()
    for line in lines:
        print(line)
    print(text, flush=True)
    if summary_file:
        try:
            filesystem, where = storage.output_filesystem(summary_file)
            with filesystem.open_output_stream(where) as f:
                f.write((text + "\n").encode())
        except OSError as e:
            raise ConfigError(f"cannot write --summary-file {summary_file}: {e}") from None


@functools.cache
def quiet_known_noise(verbose: bool = False) -> None:
    """Keep a run's console for people: the known, harmless lines of dependencies are
    dropped where they are logged, and chatty INFO loggers speak from WARNING on (Ray's
    log files keep what Ray logs). Each process calls it: the driver, and each worker."""
    if verbose:
        return
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, starts in KNOWN_NOISE.items():
        logging.getLogger(name).addFilter(lambda record, starts=starts: not record.getMessage().startswith(starts))
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def run_main(main: Callable[[], Any]) -> None:
    """Run an entry point: user errors become one line on stderr and exit status 2.

    Off a terminal (a log file, `ray job logs`) progress bars are off: their control
    characters would land among the job's lines.
    """
    from ray.train import TrainingFailedError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_known_noise(verbose="--verbose" in sys.argv[1:])
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # the hub's, transformers' and datasets' bars
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # ConfigError, DataError, SpecialTokenError among them
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    except TrainingFailedError as e:
        print(f"error: training failed: {' '.join(str(e).split())[:2000]}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
