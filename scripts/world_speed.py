"""Images per second of two embedded-world configs side by side, one process, one thread.

For each config: the sampler alone (`sampling.prompts_per_iteration` prompts x K, the config's
steps, guidance and step design) and one whole single-process iteration (sample, score, learn:
`loop_ray.training.single_process.SingleProcessRun.step`), alternating the configs `--repeats` times and reporting medians
and the ratio of the second config's images/s to the first's (higher is faster). For example, the
committed 24x24 embedded model against a 32x32 one of the same design:

    loop-ray pretrain-toy --out /tmp/toy32 --image-size 32
    python scripts/world_speed.py --base configs/toy.yaml --base-set model.path=/tmp/toy32 --new configs/toy.yaml
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _run(cfg_path: str, overrides: list[str], iteration: int) -> dict:
    from loop_ray.config import load_config
    from loop_ray.training.single_process import SingleProcessRun

    cfg = load_config(cfg_path, overrides + ["learner.num_workers=1"])
    run = SingleProcessRun(cfg)
    n = cfg.sampling.prompts_per_iteration * cfg.sampling.k
    start = time.perf_counter()
    run.sample_and_score(iteration)
    sample_s = time.perf_counter() - start
    start = time.perf_counter()
    run.step(iteration + 1)
    step_s = time.perf_counter() - start
    return {"images": n, "sampler_images_per_s": n / sample_s, "iteration_images_per_s": n / step_s}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True)
    p.add_argument("--base-set", action="append", default=[])
    p.add_argument("--new", required=True)
    p.add_argument("--new-set", action="append", default=[])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from loop_ray.utils import pin_threads

    pin_threads(1)
    results: dict[str, list[dict]] = {"base": [], "new": []}
    for r in range(args.repeats):
        results["base"].append(_run(args.base, args.base_set, 2 * r))
        results["new"].append(_run(args.new, args.new_set, 2 * r))
    report = {}
    for key in ("sampler_images_per_s", "iteration_images_per_s"):
        base = statistics.median(x[key] for x in results["base"])
        new = statistics.median(x[key] for x in results["new"])
        report[key] = {"base": round(base, 2), "new": round(new, 2), "throughput_ratio": round(new / base, 2)}
        print(f"{key}: base {base:.2f}, new {new:.2f}, ratio {new / base:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"report": report, "runs": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
