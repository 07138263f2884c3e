"""`loop-ray sample`: N images for each --prompt; --out a .png file (the grid) or a folder (one PNG per
image and grid.png) (loop_ray.evaluation.evaluate.sample_images / write_samples)."""

from __future__ import annotations

import argparse

from loop_ray.cli.model_args import add_model_args
from loop_ray.evaluation.evaluate import load_policy, sample_images, samples_target, write_samples


def main(argv: list[str] | None = None) -> int:
    from loop_ray.utils import output_folder

    p = argparse.ArgumentParser(prog="loop-ray sample", description="sample N images per prompt into a grid PNG, "
                                "or into a folder with one PNG per image")
    add_model_args(p)
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for more)")
    p.add_argument("-n", "--num-images", type=int, default=8, help="images per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.png",
                   help="a .png path: the grid; a folder: one PNG per image plus grid.png (default: samples.png)")
    args = p.parse_args(argv)
    if args.num_images < 1:
        p.error("-n must be >= 1")
    out, folder = samples_target(args.out)
    output_folder(out if folder else out.parent)  # fails now rather than after the sampling
    cfg, policy = load_policy(args.config, args.set, args.checkpoint, args.device)
    images = sample_images(cfg, policy, args.prompt, args.num_images, args.seed)
    written = write_samples(images, args.prompt, out, folder)
    if folder:
        print(f"wrote {len(written) - 1} images and {written[0]} in {out}")
    else:
        print(f"wrote {written[0]}")
    return 0
