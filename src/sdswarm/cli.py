"""Command line: `sdswarm mother CONFIG`, and `python server.py -m CONFIG` as in the how-to."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import transformers
import yaml

from sdswarm.config import ConfigError, load_config

log = logging.getLogger("sdswarm")


def parse_overrides(pairs: Sequence[str]) -> dict:
    """`--set train.max_steps=20` -> {"train.max_steps": 20}; values are read as YAML."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set train.max_steps=100")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output.dir")
    parser.add_argument("--max-steps", type=int, help="stop after this many local steps (train.max_steps)")
    parser.add_argument("--output", help="output folder (output.dir)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set swarm.target_batch_size=64 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdswarm", description="Fine-tune Stable Diffusion together with hivemind.")
    commands = parser.add_subparsers(dest="command", required=True)
    mother = commands.add_parser("mother", help="start the first node of a swarm and train")
    mother.add_argument("config", help="YAML training config, e.g. configs/sd_1-5.yaml")
    add_training_arguments(mother)
    server = commands.add_parser("server", help="the how-to's server.py entry point")
    server.add_argument("-m", "--mother", required=True, metavar="CONFIG", help="start in mother mode with CONFIG")
    add_training_arguments(server)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        overrides = parse_overrides(args.overrides)
        if args.max_steps is not None:
            overrides["train.max_steps"] = args.max_steps
        if args.output is not None:
            overrides["output.dir"] = args.output
        config = load_config(args.config if args.command == "mother" else args.mother, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from sdswarm.node import run_mother  # heavy imports only once the config is known to be good

    transformers.logging.set_verbosity_error()  # it warns about image processors SD training never uses

    run_mother(config, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
