"""`loop-ray bench` / `make bench`: speed and memory as throughput ratios against baselines run in the
same process (loop_ray.bench)."""

from __future__ import annotations

import argparse

from loop_ray.bench import BENCHMARKS, markdown, run_bench


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="loop-ray bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--no-sd2", action="store_true", help="skip the SD2-shaped UNet in the weights figure")
    args = p.parse_args(argv)
    report = run_bench(args.out, args.repeats, tuple(args.only), args.batch, args.steps, not args.no_sd2)
    print(markdown(report))
    print(f"wrote {args.out}/bench.json and bench.md")
    return 0
