"""Hyper-parameter sweep of LOOP on the embedded world with the single-process loop.

Runs a grid of `--set`-style overrides over a base config (default configs/toy.yaml), each for the
same number of iterations, in parallel processes on one device, and prints the held-out reward per
category before and after. Used to choose configs/toy.yaml's learning rate, clip range and update
schedule on a lent GPU; the result on the CPU is then checked with `make run`.

    python scripts/toy_sweep.py --device cuda --workers 8 \
        --grid learner.lr=1e-5,1e-4,3e-4 --grid algorithm.clip_eps=1e-3,1e-2 --seeds 0 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _one(job: dict) -> dict:

    from loop_ray.config import config_from_dict, read_config_data
    from loop_ray.evaluation.evaluate import category_means
    from loop_ray.training.single_process import SingleProcessRun
    from loop_ray.utils import pin_threads

    pin_threads(1)
    data = read_config_data(job["config"])
    overrides = dict(job["overrides"])
    control = overrides.pop("control", None)  # shuffle: the config's algorithm.control; negate: see below
    if control in ("none", "shuffle"):
        overrides["algorithm.control"], control = control, None
    cfg = config_from_dict(data, source=job["config"], overrides=overrides)
    start = time.perf_counter()
    run = SingleProcessRun(cfg, device=job["device"])
    if control is not None:
        _apply_control(run, control, cfg.seed)
    result = run.run()
    h = result["history"]
    return {
        "overrides": job["overrides"],
        "before": category_means(result["before"]),
        "after": category_means(result["after"]),
        "train_reward": [round(x["train/reward_mean"], 4) for x in h],
        "approx_kl": [round(x["learner/approx_kl"], 6) for x in h],
        "clip_fraction": [round(x["learner/clip_fraction"], 3) for x in h],
        "kl_ref": [round(x.get("learner/kl_ref", 0.0), 6) for x in h],
        "seconds": round(time.perf_counter() - start, 1),
    }


def _apply_control(run, control: str, seed: int) -> None:
    """The `negate` control: train on negated advantages (a run that loses reward faster than its
    shuffled control, `algorithm.control: shuffle`, points at a sign error)."""
    import torch

    sample_and_score = run.sample_and_score
    generator = torch.Generator().manual_seed(seed)

    def controlled(iteration):
        out = sample_and_score(iteration)
        batch = out[0] if isinstance(out, tuple) else out
        if control == "shuffle":
            batch.advantages = batch.advantages[torch.randperm(len(batch.advantages), generator=generator)]
        elif control == "negate":
            batch.advantages = -batch.advantages
        else:
            raise ValueError(f"control={control!r}: use shuffle or negate")
        return out

    run.sample_and_score = controlled


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/toy.yaml")
    p.add_argument("--grid", action="append", default=[], help="KEY=V1,V2,...")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE applied to every run")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--variants", default=None, help="JSON file: a list of override dicts, run besides the grid")
    p.add_argument("--out", default=None, help="JSON-lines file, one line per finished run")
    args = p.parse_args()
    from loop_ray.config import parse_overrides

    fixed = parse_overrides(args.set)
    axes = [(g.split("=", 1)[0], [parse_overrides([f"x={v}"])["x"] for v in g.split("=", 1)[1].split(",")])
            for g in args.grid]
    combos = [dict(zip([k for k, _ in axes], values)) for values in itertools.product(*[v for _, v in axes])]
    if args.variants:
        combos = json.loads(Path(args.variants).read_text()) + (combos if args.grid else [])
    jobs = [{"config": args.config, "overrides": {**fixed, **c, "seed": seed}, "device": args.device}
            for c in combos for seed in args.seeds]
    import multiprocessing as mp
    from concurrent.futures import as_completed

    results = []
    with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
        for future in as_completed([pool.submit(_one, j) for j in jobs]):
            results.append(future.result())
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(results[-1]) + "\n")
            print(f"done {len(results)}/{len(jobs)}: {results[-1]['overrides']} after "
                  f"{ {c: round(v, 3) for c, v in results[-1]['after'].items()} }", flush=True)
    for r in results:
        after = " ".join(f"{c}={v:.3f}" for c, v in r["after"].items())
        before = " ".join(f"{c}={v:.3f}" for c, v in r["before"].items())
        print(f"{r['overrides']}\n  before {before}\n  after  {after}  ({r['seconds']} s)\n"
              f"  train {r['train_reward']}\n  kl {r['approx_kl'][-3:]} clip {r['clip_fraction'][-3:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
