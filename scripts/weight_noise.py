"""How fragile is the embedded model to undirected weight changes? A diagnostic for `make run`.

Adds independent Gaussian noise of standard deviation `std` to every UNet weight of the committed
toy model and evaluates the held-out reward (the config's eval prompts and fixed seeds). An Adam
step moves every weight by about lr whatever its gradient, so n steps whose gradients are mostly
noise move each weight by about lr * sqrt(n) in a random direction: the std at which the reward
falls is the step budget that RL must stay within unless its gradient is mostly signal.

    python scripts/weight_noise.py --std 0 2e-4 5e-4 1e-3 --set prompts.val=toy:val:two_object
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/toy.yaml")
    p.add_argument("--std", nargs="+", type=float, required=True, help="absolute noise std per weight")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE config override")
    args = p.parse_args()

    import torch

    from loop_ray.config import load_config, parse_overrides
    from loop_ray.training.single_process import SingleProcessRun
    from loop_ray.utils import pin_threads

    pin_threads(1)
    cfg = load_config(args.config, parse_overrides(args.set))
    run = SingleProcessRun(cfg)
    clean = {k: v.clone() for k, v in run.policy.unet.state_dict().items()}
    for std in args.std:
        generator = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            for name, param in run.policy.unet.named_parameters():
                param.copy_(clean[name] + std * torch.randn(param.shape, generator=generator))
        result = run.evaluate()
        row = {"std": std, "mean": round(result["mean"], 4),
               **{c: round(v["mean"], 4) for c, v in result["categories"].items()}}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
