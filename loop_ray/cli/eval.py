"""`loop-ray eval`: the held-out reward per prompt category, eval.json and grid.png
(loop_ray.evaluation.evaluate.run_eval)."""

from __future__ import annotations

import argparse
from pathlib import Path

from loop_ray.cli.model_args import add_model_args
from loop_ray.evaluation.evaluate import format_table, load_policy, run_eval


def main(argv: list[str] | None = None) -> int:
    from loop_ray.utils import output_folder

    p = argparse.ArgumentParser(prog="loop-ray eval", description="per-category held-out reward table, eval.json "
                                "and grid.png in --out")
    add_model_args(p)
    p.add_argument("--out", default=None, help="output folder (default: OUTPUT_DIR/NAME/eval)")
    p.add_argument("--images-per-prompt", type=int, default=None, help="default: eval.images_per_prompt")
    args = p.parse_args(argv)
    overrides = list(args.set)
    if args.images_per_prompt is not None:
        if args.images_per_prompt < 1:
            p.error("--images-per-prompt must be >= 1")
        overrides.append(f"eval.images_per_prompt={args.images_per_prompt}")
    cfg, policy = load_policy(args.config, overrides, args.checkpoint, args.device)
    out = output_folder(args.out or Path(cfg.output_dir) / cfg.name / "eval")
    result, grid, path = run_eval(cfg, policy, out, progress=not args.no_progress)
    model = cfg.model.path or f"({cfg.model.kind} default)"
    print(f"model {model}, {cfg.sampling.num_steps} steps, guidance {cfg.sampling.guidance_scale}, eta {cfg.sampling.eta}")
    print(format_table(result))
    print(f"wrote {path} and {grid} ({result['seconds']:.0f} s)")
    return 0
