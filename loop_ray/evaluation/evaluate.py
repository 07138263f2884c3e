"""`loop-ray eval` and `loop-ray sample`: held-out reward per prompt category, and image grids.

Library pieces (the driver calls them too):
  evaluate_policy(policy, reward, prompt_set, images_per_prompt, seed, batch_size) -> dict
  format_table(result) -> str          per-category table
  write_eval_json(result, path)        the result without its image array
  save_grid(images, prompts, path)     one row of images per prompt, the prompt written beside it
  save_eval_grid(...)                  an evaluation's grid: prompts from the categories in turn
Image j of prompt i (i its index in the prompt source) uses the seed
seed * 1_000_003 + i * images_per_prompt + j (loop_ray.evaluation.heldout), the same seeds as the training
driver's evaluation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from loop_ray.evaluation.heldout import eval_prompt_indices, eval_seeds


def _score(reward, images: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Rewards [B] (NaN where invalid) and, for a CompositeReward, each term's values."""
    if hasattr(reward, "score"):
        total, parts = reward.score(images, prompts)
        return np.asarray(total, dtype=np.float32), {k: np.asarray(v, dtype=np.float32) for k, v in parts.items()}
    from loop_ray.rewards.checks import call_reward

    return call_reward(reward, images, prompts, getattr(reward, "__name__", type(reward).__name__))[0], {}


def evaluate_policy(
    policy,
    reward,
    prompt_set,
    images_per_prompt: int = 10,
    seed: int = 1234,
    batch_size: int = 32,
    prompt_indices: Sequence[int] | None = None,
    progress: bool = False,
) -> dict:
    """Sample `images_per_prompt` images per prompt with fixed seeds, score them, reduce per category.

    policy: anything with `sample(prompts, k, seeds, batch_size=...) -> TrajectoryBatch`;
    reward: a callable (images, prompts) -> [B] (a CompositeReward's terms are reported too);
    prompt_set: a PromptSet (prompts with categories); prompt_indices: a subset (default all).
    Returns a dict: "mean", "categories" {category: {"mean", "std", "prompts", "images"}}, "terms",
    "per_prompt" [{"prompt", "category", "mean", "rewards"}], the settings, "seconds", and the arrays
    "images" uint8 [P, K, H, W, 3] and "rewards" float32 [P, K]. Images the reward scored invalid
    (NaN, inf; a CompositeReward also marks wrong shapes and errors so) are NaN in "rewards", left
    out of every mean and std, and counted in "rejected_images".
    """
    from tqdm import tqdm

    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be >= 1, got {images_per_prompt}")
    indices = list(range(len(prompt_set))) if prompt_indices is None else [int(i) for i in prompt_indices]
    if not indices:
        raise ValueError(f"no prompts to evaluate in {getattr(prompt_set, 'source', 'the prompt set')}")
    k = images_per_prompt
    seeds = eval_seeds(seed, indices, k)
    per_call = max(1, batch_size // k)  # whole prompts per sample() call keeps stored trajectories small
    start = time.time()
    images, rewards, parts = [], [], {}
    for a in tqdm(range(0, len(indices), per_call), desc="eval", disable=not progress, file=sys.stderr):
        chunk = indices[a : a + per_call]
        prompts = [prompt_set.prompts[i] for i in chunk]
        batch = policy.sample(prompts, k, seeds[a * k : (a + len(chunk)) * k], batch_size=batch_size)
        imgs = np.asarray(batch.images.numpy() if hasattr(batch.images, "numpy") else batch.images, dtype=np.uint8)
        r, p = _score(reward, imgs, list(batch.prompts))
        images.append(imgs)
        rewards.append(r)
        for name, v in p.items():
            parts.setdefault(name, []).append(v)
    images_arr = np.concatenate(images).reshape(len(indices), k, *images[0].shape[1:])
    rewards_arr = np.concatenate(rewards).reshape(len(indices), k)
    cats = [prompt_set.categories[i] for i in indices]
    categories = {}
    rewards_arr[~np.isfinite(rewards_arr)] = np.nan  # invalid: left out below
    for c in dict.fromkeys(cats):
        rows = rewards_arr[[j for j, cc in enumerate(cats) if cc == c]]
        categories[c] = {"mean": finite_mean(rows), "std": finite_mean(rows, std=True), "prompts": len(rows),
                         "images": rows.size}
    return {
        "mean": finite_mean(rewards_arr),
        "rejected_images": int(np.isnan(rewards_arr).sum()),
        "categories": categories,
        "terms": {name: finite_mean(np.concatenate(v)) for name, v in parts.items()},
        "per_prompt": [
            {"prompt": prompt_set.prompts[i], "category": c, "mean": finite_mean(r), "rewards": [round(float(x), 4) for x in r]}
            for i, c, r in zip(indices, cats, rewards_arr)
        ],
        "images_per_prompt": k,
        "seed": seed,
        "prompt_source": getattr(prompt_set, "source", None),
        "seconds": round(time.time() - start, 2),
        "images": images_arr,
        "rewards": rewards_arr,
    }


def finite_mean(values: np.ndarray, std: bool = False) -> float:
    """Mean (or std) of the finite values; NaN when there are none."""
    values = np.asarray(values)[np.isfinite(values)]
    if not values.size:
        return float("nan")
    return float(values.std() if std else values.mean())


def format_table(result: dict) -> str:
    """The per-category table of an `evaluate_policy` result, with an "all" row."""
    lines = [f"{'category':<24}{'prompts':>8}{'images':>8}{'reward':>9}{'std':>8}"]
    for c, v in result["categories"].items():
        lines.append(f"{c:<24}{v['prompts']:>8}{v['images']:>8}{v['mean']:>9.3f}{v['std']:>8.3f}")
    n_prompts = sum(v["prompts"] for v in result["categories"].values())
    n_images = sum(v["images"] for v in result["categories"].values())
    lines.append(f"{'all':<24}{n_prompts:>8}{n_images:>8}{result['mean']:>9.3f}{'':>8}")
    return "\n".join(lines)


def write_eval_json(result: dict, path: str | Path, extra: dict | None = None) -> Path:
    """Write the result (without the "images" and "rewards" arrays) and `extra` fields as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in result.items() if k not in ("images", "rewards")}
    data.update(extra or {})
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def save_grid(
    images: np.ndarray,
    prompts: Sequence[str],
    path: str | Path,
    rewards: np.ndarray | None = None,
    max_prompts: int = 8,
    max_images: int = 8,
    cell: int = 64,
) -> Path:
    """A PNG with one row per prompt: up to `max_images` of its images (uint8 [P, K, H, W, 3], each
    scaled to `cell` px, nearest neighbour), then the prompt text and, if given, each image's reward."""
    from PIL import Image, ImageDraw

    images = np.asarray(images)
    if images.ndim != 5 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"save_grid takes uint8 images [P, K, H, W, 3], got {images.dtype} {images.shape}")
    if len(prompts) != len(images):
        raise ValueError(f"save_grid: {len(images)} rows of images but {len(prompts)} prompts")
    rows, cols = min(max_prompts, len(images)), min(max_images, images.shape[1])
    if rows == 0:
        raise ValueError("save_grid: nothing to draw (no prompts)")
    pad, text_w = 4, 420
    canvas = Image.new("RGB", (cols * (cell + pad) + pad + text_w, rows * (cell + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(rows):
        y = pad + i * (cell + pad)
        for j in range(cols):
            tile = Image.fromarray(images[i, j]).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (pad + j * (cell + pad), y))
        x = cols * (cell + pad) + pad
        draw.text((x, y + 4), str(prompts[i]), fill=(0, 0, 0))
        if rewards is not None:
            values = " ".join(f"{float(v):.2f}" for v in np.asarray(rewards)[i, :cols])
            draw.text((x, y + 20), f"reward: {values}", fill=(90, 90, 90))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def grid_rows(categories: Sequence[str], n: int) -> list[int]:
    """Indices of up to n rows taken from the categories in turn (first rows of each first)."""
    queues: dict[str, list[int]] = {}
    for i, c in enumerate(categories):
        queues.setdefault(c, []).append(i)
    picked: list[int] = []
    while len(picked) < min(n, len(categories)):
        for q in queues.values():
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return sorted(picked)


GRID_IMAGES = 8  # images per prompt in an evaluation grid


def save_eval_grid(
    path: str | Path,
    prompts: Sequence[str],
    categories: Sequence[str],
    rewards: np.ndarray,
    num_prompts: int,
    images: Callable[[list[int], int], np.ndarray | None],
) -> Path | None:
    """An evaluation's grid (both `loop-ray eval` and the training driver's): up to `num_prompts`
    prompts taken from the categories in turn (`grid_rows`), the first GRID_IMAGES images of each
    with their rewards (`rewards` [P, K]). `images(rows, n)` gives the first n images of each of those
    prompts, uint8 [len(rows), n, H, W, 3], or None when they cannot be had; then no grid is drawn
    and None returned."""
    rows = grid_rows(categories, num_prompts)
    rewards = np.asarray(rewards)
    per_row = min(rewards.shape[1], GRID_IMAGES)
    picked = images(rows, per_row)
    if picked is None:
        return None
    return save_grid(picked, [prompts[r] for r in rows], path, rewards=rewards[rows, :per_row],
                     max_prompts=len(rows), max_images=per_row)


# ------------------------------------------------------------------------------------------ CLI


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """(model folder, config.yaml to use by default) of `--checkpoint PATH`:
      a run folder (it has checkpoints/): its newest checkpoint that verifies, and that checkpoint's
        config.yaml (the run's own config, as it was when those weights were saved);
      a loop-ray checkpoint folder (MANIFEST.json, or under checkpoints/): itself once it verifies
        against its manifest, and its config.yaml;
      any other folder: a model folder of the config's model.kind (diffusers layout), and no config.
    Raises ConfigError / CheckpointError naming the path."""
    from loop_ray.config import ConfigError
    from loop_ray.system.run.resume import newest_good_point
    from loop_ray.training.checkpoint import MANIFEST, verify_checkpoint

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--checkpoint {path}: no such folder")
    if not path.is_dir():
        raise ConfigError(f"--checkpoint {path}: not a folder (expected a checkpoint, a run or a model folder)")
    if (path / "checkpoints").is_dir():
        point = newest_good_point(path)
        if point is None:
            raise ConfigError(f"--checkpoint {path}: no usable checkpoint under {path / 'checkpoints'}")
        folder = point.checkpoint
    elif (path / MANIFEST).is_file() or path.parent.name == "checkpoints":
        verify_checkpoint(path)
        folder = path
    else:
        return path, None
    if not (folder / "model_index.json").is_file():
        raise ConfigError(
            f"--checkpoint {folder}: holds the trained network but not the whole pipeline (no model_index.json: "
            "written before checkpoints held it); load its unet/ or transformer/ into the base model's pipeline"
        )
    return folder, folder / "config.yaml"


def _load(args: argparse.Namespace):
    """(cfg, policy) from --config, --set and --checkpoint (a checkpoint or run folder brings its own
    config, and then --config may be left out). Raises ConfigError naming the bad field or path."""
    from loop_ray.config import ConfigError, load_config
    from loop_ray.diffusion.factory import build_policy
    from loop_ray.diffusion.pipeline_parts import FOLDER_KIND
    from loop_ray.utils import pin_threads

    folder, own_config = resolve_checkpoint(args.checkpoint) if args.checkpoint is not None else (None, None)
    config = args.config if args.config is not None else own_config
    if config is None:
        raise ConfigError("--config is required (unless --checkpoint is a loop-ray checkpoint or run folder)")
    cfg = load_config(config, args.set)
    if folder is not None:
        kind = FOLDER_KIND.get(cfg.model.kind, cfg.model.kind)  # a tiny stack's checkpoint is a real folder
        # the saved network has any LoRA merged, and a folder takes no Hugging Face revision
        cfg.model = cfg.model.model_copy(update={"path": str(folder), "kind": kind, "revision": None, "lora_rank": 0})
    pin_threads(cfg.cluster.torch_threads)
    return cfg, build_policy(cfg, args.device)


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="experiment YAML (default: the --checkpoint run's own)")
    p.add_argument("--checkpoint", default=None,
                   help="a run folder (its newest good checkpoint), one of its checkpoint folders, or a model "
                        "folder (diffusers layout) in place of model.path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted-key config override")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")


def main_eval(argv: list[str] | None = None) -> int:
    """`loop-ray eval`: per-category held-out reward table, eval.json and grid.png in --out."""
    from loop_ray.prompts import load_prompts
    from loop_ray.rewards.composite import CompositeReward
    from loop_ray.utils import output_folder

    p = argparse.ArgumentParser(prog="loop-ray eval", description=main_eval.__doc__)
    _common_args(p)
    p.add_argument("--out", default=None, help="output folder (default: OUTPUT_DIR/NAME/eval)")
    p.add_argument("--images-per-prompt", type=int, default=None, help="default: eval.images_per_prompt")
    args = p.parse_args(argv)
    if args.images_per_prompt is not None:
        if args.images_per_prompt < 1:
            p.error("--images-per-prompt must be >= 1")
        args.set = [*args.set, f"eval.images_per_prompt={args.images_per_prompt}"]
    cfg, policy = _load(args)
    out = output_folder(args.out or Path(cfg.output_dir) / cfg.name / "eval")
    reward = CompositeReward.from_config(cfg.reward)
    prompt_set = load_prompts(cfg.prompts.val)
    indices = eval_prompt_indices(cfg, prompt_set)  # the driver's choice of prompts (eval.max_prompts)
    result = evaluate_policy(
        policy, reward, prompt_set, cfg.eval.images_per_prompt, cfg.eval.seed, cfg.eval.batch_size,
        prompt_indices=indices, progress=not args.no_progress,
    )
    model = cfg.model.path or f"({cfg.model.kind} default)"
    print(f"model {model}, {cfg.sampling.num_steps} steps, guidance {cfg.sampling.guidance_scale}, eta {cfg.sampling.eta}")
    print(format_table(result))
    per_prompt = result["per_prompt"]
    grid = save_eval_grid(out / "grid.png", [r["prompt"] for r in per_prompt], [r["category"] for r in per_prompt],
                          result["rewards"], cfg.eval.grid_prompts or 8, lambda rows, n: result["images"][rows, :n])
    settings = {"model": model, "sampling": cfg.sampling.model_dump(), "reward": cfg.reward.model_dump()}
    path = write_eval_json(result, out / "eval.json", extra={"settings": settings})
    print(f"wrote {path} and {grid} ({result['seconds']:.0f} s)")
    return 0


def main_sample(argv: list[str] | None = None) -> int:
    """`loop-ray sample`: N images for each --prompt into a grid PNG."""
    from loop_ray.utils import output_folder

    p = argparse.ArgumentParser(prog="loop-ray sample", description=main_sample.__doc__)
    _common_args(p)
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for more)")
    p.add_argument("-n", "--num-images", type=int, default=8, help="images per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.png", help="grid PNG path")
    args = p.parse_args(argv)
    if args.num_images < 1:
        p.error("-n must be >= 1")
    output_folder(Path(args.out).parent)
    cfg, policy = _load(args)
    seeds = eval_seeds(args.seed, range(len(args.prompt)), args.num_images)
    batch = policy.sample(args.prompt, args.num_images, seeds, batch_size=cfg.sampling.batch_size)
    images = np.asarray(batch.images).reshape(len(args.prompt), args.num_images, *batch.images.shape[1:])
    path = save_grid(images, args.prompt, args.out, max_prompts=len(args.prompt), max_images=args.num_images)
    print(f"wrote {path}")
    return 0
