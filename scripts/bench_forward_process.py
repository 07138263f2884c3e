"""End-to-end images/s of the forward-process presets (nft, rwr) beside LOOP through the Ray system
(sync mode) on the embedded world, and the size of one sampler record.

Every method runs the same small iteration (prompts x K images, one learner worker, one sampler)
from configs/toy.yaml with its preset's keys applied as `loop-ray study` applies them; an
iteration's time is the driver's `iteration_seconds` (sample + score + learn + publish), the first
iteration being the warm-up. Methods run one after another, `--rounds` times in turn, so a slow
period of a shared machine falls on all of them; the figures are ratios against LOOP's in the same
run. The record size is the bytes of the tensors of one sampled TrajectoryBatch of the same batch.

    python scripts/bench_forward_process.py --iterations 4 --rounds 2 --out runs/bench_forward_process.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

METHODS = {"loop": "loop_k4", "nft": "nft", "rwr": "rwr"}


def _cfg(method: str, iterations: int, images: int, out: str):
    from loop_ray.config import load_config
    from loop_ray.study import method_overrides

    overrides = {
        **method_overrides(METHODS[method], images), "iterations": iterations, "output_dir": out,
        "learner.num_workers": 1, "learner.minibatch_size": 8, "learner.minibatches_per_step": 1,
        "eval.max_prompts": 1, "eval.images_per_prompt": 1, "logging.progress_bar": False,
        "logging.tensorboard": False, "cluster.num_samplers": 1, "cluster.sampler_cpus": 0.5,
        "cluster.reward_cpus": 0.25, "learner.num_cpus_per_worker": 0.5,
    }
    return load_config("configs/toy.yaml", overrides)


def record_bytes(cfg) -> int:
    """Bytes of the tensors of one TrajectoryBatch of the config's iteration, as a sampler returns it."""
    from loop_ray.diffusion.factory import build_policy

    policy = build_policy(cfg)
    k, n = cfg.sampling.k, cfg.sampling.prompts_per_iteration
    batch = policy.sample(["a red circle"] * n, k, list(range(n * k)),
                          clean_only=cfg.algorithm.objective != "policy_gradient")
    return sum(v.nbytes for v in vars(batch).values() if isinstance(v, torch.Tensor))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=4, help="per method and round; the first is the warm-up")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--images", type=int, default=16, help="images per iteration (divisible by K = 4)")
    p.add_argument("--out", default="runs/bench_forward_process.json")
    args = p.parse_args(argv)

    from loop_ray.system.run.driver import train

    times: dict[str, list[float]] = {m: [] for m in METHODS}
    sampler: dict[str, list[float]] = {m: [] for m in METHODS}
    learner: dict[str, list[float]] = {m: [] for m in METHODS}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for method in METHODS:
                result = train(_cfg(method, args.iterations, args.images, tmp))
                records = [r for r in result.records if r.get("kind") == "train"][1:]
                times[method] += [r["iteration_seconds"] for r in records]
                sampler[method] += [r["throughput/sampler_images_per_s"] for r in records]
                learner[method] += [r["learner/seconds"] for r in records]
    report = {"images_per_iteration": args.images, "iterations": args.iterations, "rounds": args.rounds}
    base = statistics.median(times["loop"])
    for method in METHODS:
        median = statistics.median(times[method])
        report[method] = {
            "iteration_seconds_median": median, "images_per_s": args.images / median,
            "images_per_s_vs_loop": base / median,
            "sampler_images_per_s_median": statistics.median(sampler[method]),
            "learner_seconds_median": statistics.median(learner[method]),
            "record_bytes": record_bytes(_cfg(method, 1, args.images, "runs")),
            "iterations_timed": len(times[method]),
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print("| method | images/s end to end | vs LOOP | sampler images/s | learner s/iteration | record bytes |")
    print("|---|---|---|---|---|---|")
    for method in METHODS:
        r = report[method]
        print(f"| {method} | {r['images_per_s']:.2f} | {r['images_per_s_vs_loop']:.2f}x | "
              f"{r['sampler_images_per_s_median']:.1f} | {r['learner_seconds_median']:.2f} | {r['record_bytes']:,} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
