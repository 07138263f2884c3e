"""The table of a learning claim: the runs of `scripts/seeds_vs_null.py` (each seed trained with its
true advantages and with them shuffled, the null) scored on the held-out prompts (the runs' own
before/after figures) and on the train prompts with seeds no run sampled, beside the pre-trained
model sampled without and with classifier-free guidance (the reference of what guidance gives).

    python scripts/claim_table.py --runs runs/claim_gain --out runs/claim_gain/table.json

Trained rows are means +- standard errors over seeds; pre-trained rows are one deterministic
evaluation each. Prints the markdown table and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.seeds_vs_null import mean_se  # the runs' own statistic, one definition

CATEGORIES = ("two_object", "all", "one_object")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", required=True, help="a seeds_vs_null.py output folder (results.jsonl)")
    p.add_argument("--config", default="configs/toy.yaml", help="the config the runs trained (pre-trained rows)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="its overrides")
    p.add_argument("--train-seed", type=int, default=4321, help="eval seed on the train prompts (no run sampled it)")
    p.add_argument("--train-images", type=int, default=5, help="images per train prompt")
    p.add_argument("--guidance", type=float, default=2.0, help="the reference row's guidance scale")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    from loop_ray.evaluation.evaluate import category_means, evaluate_policy, load_policy
    from loop_ray.evaluation.heldout import eval_prompt_indices
    from loop_ray.prompts import load_prompts
    from loop_ray.rewards.composite import CompositeReward

    records_path = Path(args.runs) / "results.jsonl"
    if not records_path.is_file():
        raise SystemExit(f"{records_path}: no such file (run scripts/seeds_vs_null.py --out {args.runs} first)")
    records = [json.loads(line) for line in records_path.read_text().splitlines() if line.strip()]

    def train_scores(cfg, policy) -> dict[str, float]:
        return category_means(evaluate_policy(policy, CompositeReward.from_config(cfg.reward),
                                              load_prompts(cfg.prompts.train), args.train_images, args.train_seed,
                                              cfg.eval.batch_size))

    def scores(cfg, policy) -> dict[str, dict[str, float]]:
        val, e = load_prompts(cfg.prompts.val), cfg.eval
        heldout = evaluate_policy(policy, CompositeReward.from_config(cfg.reward), val, e.images_per_prompt, e.seed,
                                  e.batch_size, eval_prompt_indices(cfg, val))
        return {"train": train_scores(cfg, policy), "heldout": category_means(heldout)}

    cfg, policy = load_policy(args.config, args.set)
    pre = scores(cfg, policy)
    policy.guidance_scale = args.guidance
    guided = scores(cfg, policy)
    rows: dict[str, list[dict]] = {"none": [], "shuffle": []}
    for r in records:  # held-out: the run's own figures; train: scored here
        cfg_r, policy_r = load_policy(None, [], r["run_dir"])
        rows[r["overrides"]["algorithm.control"]].append({"seed": r["overrides"]["seed"], "heldout": r["after"],
                                                         "train": train_scores(cfg_r, policy_r)})
        print(f"scored {r['run_dir']}", flush=True)

    head = "| model | " + " | ".join(f"held-out {c}" for c in CATEGORIES) + " | " + \
        " | ".join(f"train {c}" for c in CATEGORIES) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(CATEGORIES))]

    def fixed(name: str, s: dict) -> str:
        return f"| {name} | " + " | ".join(f"{s[split][c]:.3f}" for split in ("heldout", "train") for c in CATEGORIES) + " |"

    def over_seeds(name: str, runs: list[dict]) -> str:
        cells = []
        for split in ("heldout", "train"):
            for c in CATEGORIES:
                m, se = mean_se([x[split][c] for x in runs])
                cells.append(f"{m:.3f} ± {se:.3f}")
        return f"| {name} ({len(runs)} seeds) | " + " | ".join(cells) + " |"

    lines.append(fixed("pre-trained", pre))
    lines.append(fixed(f"pre-trained, guidance {args.guidance:g} (reference)", guided))
    if rows["none"]:
        lines.append(over_seeds("trained", rows["none"]))
    if rows["shuffle"]:
        lines.append(over_seeds("trained, advantages shuffled (null)", rows["shuffle"]))
    table = "\n".join(lines)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"pretrained": pre, "guided": guided, "guidance": args.guidance, "runs": rows,
                               "train_seed": args.train_seed, "train_images": args.train_images,
                               "table": table}, indent=2) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
