"""How much of guidance's held-out gain a trainable subset can hold: distil guidance w into the
config's policy (its `model.trainable` / `model.freeze` / LoRA subset, loop_ray.alignment) and
evaluate the held-out reward per category before and after, sampled without guidance, beside the
pre-trained model sampled with guidance w. The reference numbers for the trainable-subset lever.

    python scripts/distill_eval.py --config configs/toy.yaml --set model.trainable=condition_gain --out runs/distill_gain.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    import torch

    from loop_ray.alignment import distill_guidance, distillation_rounds
    from loop_ray.config import load_config
    from loop_ray.diffusion.factory import build_policy
    from loop_ray.evaluation.evaluate import category_means, evaluate_policy
    from loop_ray.evaluation.heldout import eval_prompt_indices
    from loop_ray.prompts import load_prompts
    from loop_ray.rewards.composite import CompositeReward
    from loop_ray.utils import pin_threads

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=24)
    p.add_argument("--images", type=int, default=256, help="images sampled per round")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.set)
    pin_threads(cfg.cluster.torch_threads)
    policy = build_policy(cfg)
    reward = CompositeReward.from_config(cfg.reward)
    val = load_prompts(cfg.prompts.val)
    e = cfg.eval
    idx = eval_prompt_indices(cfg, val)

    def evaluate(pol) -> dict:
        return category_means(evaluate_policy(pol, reward, val, e.images_per_prompt, e.seed, e.batch_size, idx))

    t0 = time.perf_counter()
    before = evaluate(policy)
    guidance = policy.guidance_scale
    policy.guidance_scale = args.guidance
    guided = evaluate(policy)
    policy.guidance_scale = guidance
    sample_round = distillation_rounds(cfg, policy, args.images)
    d, _ = distill_guidance(policy, args.guidance, sample_round, rounds=args.rounds, lr=args.lr, minibatch=64,
                            generator=torch.Generator().manual_seed(cfg.seed), log=print, keep=True)
    after = evaluate(policy)
    result = {"config": args.config, "overrides": args.set, "guidance": args.guidance, "rounds": args.rounds,
              "images_per_round": args.images, "lr": args.lr, "trainable_parameters": int(d.numel()),
              "change_norm": float(d.norm()), "before": before, "guided": guided, "after": after,
              "seconds": time.perf_counter() - t0}
    for name in ("guided", "after"):
        print(name, {c: round(result[name][c] - before[c], 4) for c in before})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
