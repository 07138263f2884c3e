"""A learning claim as the project counts one: a config trained with several seeds through the Ray
system (`loop-ray train`, exactly what `make run` runs), each beside the same run with its
advantages shuffled across samples (`algorithm.control: shuffle`, the null).

For every (control, seed) it records the held-out reward per prompt category before and after and
the eval grids, then prints, per category, the mean gain over seeds with its standard error
(sample std / sqrt(seeds)) for the true run and the null, and their difference in units of its
standard error, z = (mean_true - mean_null) / sqrt(se_true^2 + se_null^2).

    python scripts/seeds_vs_null.py --config configs/toy.yaml --seeds 0 1 2 --out runs/claim_toy
    python scripts/seeds_vs_null.py --config configs/toy_easy.yaml --set iterations=12 --out runs/claim_easy
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _one(config: str, overrides: dict, out: Path) -> dict:
    from loop_ray.config import load_config
    from loop_ray.system.run.driver import train

    start = time.perf_counter()
    result = train(load_config(config, {**overrides, "output_dir": str(out)}))
    return {
        "overrides": overrides,
        "run_dir": str(result.run_dir),
        "before": {"all": result.before.mean, **result.before.by_category},
        "after": {"all": result.after.mean, **result.after.by_category},
        "grids": [str(result.before.grid), str(result.after.grid)],
        "train_reward": [r["train/reward_mean"] for r in result.records if r.get("kind") == "train"],
        "seconds": time.perf_counter() - start,
    }


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def summarise(runs: list[dict]) -> str:
    """Markdown: per category, before, gain true / null (mean +- s.e. over seeds) and z."""
    categories = list(runs[0]["after"])
    lines = ["| category | before | gain, true | gain, shuffled | z (true - shuffled) | per-seed gains, true |",
             "|---|---|---|---|---|---|"]
    for c in categories:
        gains = {ctl: [r["after"][c] - r["before"][c] for r in runs if r["overrides"]["algorithm.control"] == ctl]
                 for ctl in ("none", "shuffle")}
        (mt, st), (mn, sn) = mean_se(gains["none"]), mean_se(gains["shuffle"])
        z = (mt - mn) / math.sqrt(st**2 + sn**2) if st > 0 or sn > 0 else float("nan")
        before = runs[0]["before"][c]
        lines.append(f"| {c} | {before:.3f} | {mt:+.3f} ± {st:.3f} | {mn:+.3f} ± {sn:.3f} | {z:+.1f} | "
                     + ", ".join(f"{g:+.3f}" for g in gains["none"]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/toy.yaml")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="runs/seeds_vs_null")
    args = p.parse_args(argv)
    from loop_ray.config import parse_overrides

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    done = [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.exists() else []
    runs = list(done)
    for seed in args.seeds:
        for control in ("none", "shuffle"):
            overrides = {**parse_overrides(args.set), "seed": seed, "algorithm.control": control}
            if any(r["overrides"] == overrides for r in done):
                continue  # finished in an earlier call
            record = _one(args.config, overrides, out / f"{control}_seed{seed}")
            runs.append(record)
            with results_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"seed {seed} control {control}: all {record['before']['all']:.3f} -> {record['after']['all']:.3f} "
                  f"({record['seconds']:.0f} s)", flush=True)
    table = summarise(runs)
    (out / "summary.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
