"""`loop-ray study` / `make study`: the paper's efficiency-effectiveness comparison on the embedded
world (loop_ray.study)."""

from __future__ import annotations

import argparse
from pathlib import Path

from loop_ray.study import METHODS, QUICK_IMAGES_PER_ITERATION, QUICK_OVERRIDES, run_study


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="loop-ray study", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/study.yaml", help="base experiment (default: configs/study.yaml)")
    p.add_argument("--out", default="runs/study", help="output folder")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", type=int, default=3, help="seeds per method (0, 1, ..., N-1); at least 1")
    p.add_argument("--images-per-iteration", type=int, default=96, help="divisible by every K (default 96)")
    p.add_argument("--iterations", type=int, default=None, help="default: the config's")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=1, help="runs in parallel (processes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 1 iteration, tiny sampling and eval")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every run (e.g. eval.max_prompts=20); not the keys each method sets")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds must be at least 1 (got {args.seeds})")
    from loop_ray.config import load_config, parse_overrides
    from loop_ray.utils import output_folder

    extra = parse_overrides(args.set)
    cfg = load_config(args.config, extra)
    output_folder(args.out)  # fails now rather than after the runs
    iterations = args.iterations if args.iterations is not None else cfg.iterations
    seeds = list(range(args.seeds))
    ipi = args.images_per_iteration
    if args.quick:
        seeds, iterations, ipi = [0], 1, QUICK_IMAGES_PER_ITERATION
        extra = {**extra, **QUICK_OVERRIDES}
    report = run_study(args.config, Path(args.out), args.methods, seeds, ipi, iterations, args.device,
                       args.workers, args.threads, extra)
    print((Path(args.out) / "table.md").read_text())
    print(f"wrote {args.out}/results.json, table.md, curves.png in {report['wall_seconds']:.0f} s")
    return 0
