"""`loop-ray diagnose`: is a config's policy-gradient direction consistent across prompts (the
default), and does it point where guidance distillation goes (`--align`)?

The consistency figures are loop_ray.diagnose's; the alignment figures loop_ray.alignment's.
`--align` computes the guidance-distillation direction of the config's model and trainable subset
first (or loads it with `--direction`, as written by `--save-direction`), then the cosine of the
config's summed policy-gradient estimate with it as the images grow, beside shuffled nulls.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loop-ray diagnose", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="experiment YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted-key config override")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--device", default="cpu")
    c = p.add_argument_group("consistency across prompts (default)")
    c.add_argument("--prompts", type=int, default=None, help="prompts (default: sampling.prompts_per_iteration)")
    c.add_argument("--splits", type=int, default=200, help="random halvings for the split-half cosine")
    c.add_argument("--iterations-of-window", type=int, default=0, metavar="I",
                   help="use iteration I's plan: its prompts, seeds and (random/sliding) window (default 0)")
    a = p.add_argument_group("alignment with guidance distillation (--align)")
    a.add_argument("--align", action="store_true", help="measure cos(policy gradient, distillation direction)")
    a.add_argument("--images", type=int, default=512, help="images summed into the policy-gradient estimate")
    a.add_argument("--every", type=int, default=32, help="report the cosine every this many images")
    a.add_argument("--nulls", type=int, default=2, help="shuffled-advantage nulls beside the true estimate")
    a.add_argument("--direction", default=None, help="a direction file written by --save-direction")
    a.add_argument("--save-direction", default=None, help="write the computed direction here (.pt)")
    a.add_argument("--teacher-guidance", type=float, default=2.0, help="the teacher's guidance scale w")
    a.add_argument("--distill-rounds", type=int, default=8, help="rounds of sampling + one regression pass")
    a.add_argument("--distill-images", type=int, default=256, help="images sampled per round")
    a.add_argument("--distill-lr", type=float, default=1e-4, help="Adam learning rate of the regression")
    return p


def _check(args) -> None:
    if args.prompts is not None and args.prompts < 3:
        raise SystemExit("loop-ray diagnose: --prompts must be >= 3")
    if args.splits < 1 or args.iterations_of_window < 0:
        raise SystemExit("loop-ray diagnose: --splits must be >= 1 and --iterations-of-window >= 0")
    if min(args.images, args.every, args.distill_rounds, args.distill_images) < 1 or args.nulls < 0:
        raise SystemExit("loop-ray diagnose: --images, --every, --distill-rounds, --distill-images must be >= 1, "
                         "--nulls >= 0")
    if args.direction and not Path(args.direction).is_file():
        raise FileNotFoundError(f"--direction {args.direction}: no such file")


def _directions(cfg, args, log) -> tuple[dict[str, torch.Tensor], dict]:
    from loop_ray.alignment import guidance_direction

    if args.direction:
        saved = torch.load(args.direction, map_location="cpu", weights_only=True)
        return _references(saved), {**saved["settings"], "file": args.direction}
    log(f"guidance distillation (w = {args.teacher_guidance}, {args.distill_rounds} rounds x "
        f"{args.distill_images} images) ...")
    computed = guidance_direction(cfg, guidance_scale=args.teacher_guidance, rounds=args.distill_rounds,
                                  images_per_round=args.distill_images, lr=args.distill_lr, device=args.device,
                                  log=log)
    if args.save_direction:
        path = Path(args.save_direction)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(computed, tmp)
        tmp.replace(path)
        log(f"wrote {path}")
    return _references(computed), computed["settings"]


def _references(computed: dict) -> dict[str, torch.Tensor]:
    """The reference directions: the distillation's parameter change and its gradient at the start."""
    return {"distilled": computed["direction"], "distill_grad": computed["gradient"]}


def main(argv: list[str] | None = None) -> int:
    from loop_ray.alignment import align, format_alignment
    from loop_ray.config import load_config
    from loop_ray.diagnose import diagnose, format_report, json_safe
    from loop_ray.utils import output_folder, pin_threads

    args = _parser().parse_args(argv)
    _check(args)
    cfg = load_config(args.config, args.set)  # a ConfigError: one line from loop_ray.cli, status 2
    for flag in ("out", "save_direction"):
        if getattr(args, flag):
            output_folder(Path(getattr(args, flag)).parent)
    pin_threads(cfg.cluster.torch_threads)
    name = f"of {args.config}" + (f" {' '.join(args.set)}" if args.set else "")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.align:
        directions, settings = _directions(cfg, args, log)
        result = align(cfg, directions, images=args.images, every=args.every, nulls=args.nulls, device=args.device,
                       log=log)
        result["direction"] = settings
        report = format_alignment(result, name)
    else:
        result = diagnose(cfg, prompts=args.prompts, splits=args.splits, iteration=args.iterations_of_window,
                          device=args.device, log=log)
        report = format_report(result, name)
    result.setdefault("settings", {}).update(config=str(args.config), overrides=list(args.set))
    print(report)
    if args.out:
        out = Path(args.out)
        out.write_text(json.dumps(json_safe(result), indent=2) + "\n")
        print(f"wrote {out}")
    return 0
