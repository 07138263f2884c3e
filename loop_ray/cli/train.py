"""`loop-ray train --config CONFIG [--set key=value ...] [--address ADDR] [--iterations N] [--resume RUN|auto]`:
train with the Ray actor-learner system (loop_ray.system.run.driver)."""

from __future__ import annotations

import argparse
import logging
import sys

from loop_ray.config import ConfigError, load_config
from loop_ray.rewards.checks import InvalidRewardsError
from loop_ray.system.run.driver import train
from loop_ray.system.run.resume import auto_resume_point, resume_point
from loop_ray.training.checkpoint import CheckpointError

log = logging.getLogger(__name__)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="loop-ray train", description="train LOOP (or another preset) with the Ray "
                                "actor-learner system")
    p.add_argument("--config", default=None, help="experiment YAML (e.g. configs/toy.yaml); with --resume RUN_DIR "
                   "the run's own config.yaml is used")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted-key override")
    p.add_argument("--address", default=None, help="Ray cluster address (else cluster.address / RAY_ADDRESS / local)")
    p.add_argument("--iterations", type=int, default=None, help="override the config's iterations")
    p.add_argument("--resume", default=None, metavar="RUN_DIR|auto",
                   help="continue a run from its newest good checkpoint; `auto`: the newest run of the config's "
                        "name under its output_dir, or a fresh run when there is none")
    args = p.parse_args(argv)
    if args.config is None and (args.resume is None or args.resume == "auto"):
        p.error("--config is required (except with --resume RUN_DIR)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    overrides = list(args.set) + ([f"iterations={args.iterations}"] if args.iterations is not None else [])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        point = None
        if args.resume not in (None, "auto"):
            point = resume_point(args.resume)
        config_path = args.config if args.config is not None else point.run_dir / "config.yaml"
        cfg = load_config(config_path, overrides)
        if args.resume == "auto":
            point = auto_resume_point(cfg)
            if point is None:
                log.info("--resume auto: no run of %r with a usable checkpoint under %s; starting a new run",
                         cfg.name, cfg.output_dir)
        train(cfg, address=args.address, resume=point)
    except (ConfigError, CheckpointError) as err:
        print(f"loop-ray train: {err}", file=sys.stderr)
        return 2
    except InvalidRewardsError as err:
        print(f"loop-ray train: {err}", file=sys.stderr)
        return 1
    return 0
