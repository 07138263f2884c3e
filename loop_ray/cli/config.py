"""`loop-ray config show CONFIG [--set key=value ...]`."""

from __future__ import annotations

import argparse
import sys

from loop_ray.config import ConfigError, config_to_yaml, load_config


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="loop-ray config")
    sub = parser.add_subparsers(dest="action", required=True)
    show = sub.add_parser("show", help="print the resolved configuration")
    show.add_argument("config")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted-key override")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as err:
        print(f"loop-ray config: {err}", file=sys.stderr)
        return 2
    print(config_to_yaml(cfg), end="")
    return 0
