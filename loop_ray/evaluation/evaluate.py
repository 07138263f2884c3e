"""Held-out reward per prompt category, and image grids: the library behind `loop-ray eval` and
`loop-ray sample` (their command lines: loop_ray.cli.eval, loop_ray.cli.sample).

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

import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from loop_ray.evaluation.heldout import eval_prompt_indices, eval_seeds, in_turn

log = logging.getLogger(__name__)


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


def category_means(result: dict) -> dict[str, float]:
    """{"all": mean, category: mean, ...} of an `evaluate_policy` result."""
    return {"all": result["mean"], **{c: v["mean"] for c, v in result["categories"].items()}}


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
    """Indices of up to n grid rows taken from the categories in turn, each category's first rows
    first (loop_ray.evaluation.heldout.in_turn)."""
    return in_turn(categories, n)


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


# ------------------------------------------------------------------- `loop-ray eval` / `sample`


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """(model folder, config.yaml to use by default) of `--checkpoint PATH`:
      a run folder (it has checkpoints/): its newest checkpoint that verifies, and that checkpoint's
        config.yaml (the run's own config, as it was when those weights were saved);
      a loop-ray checkpoint folder (MANIFEST.json, or under checkpoints/): itself once it verifies
        against its manifest, and its config.yaml;
      any other folder: a model folder of the config's model.kind (diffusers layout), and no config.
    Raises ConfigError / CheckpointError naming the path."""
    from loop_ray.config import ConfigError
    from loop_ray.training.checkpoint import MANIFEST, latest_good_checkpoint, verify_checkpoint

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--checkpoint {path}: no such folder")
    if not path.is_dir():
        raise ConfigError(f"--checkpoint {path}: not a folder (expected a checkpoint, a run or a model folder)")
    if (path / "checkpoints").is_dir():
        found = latest_good_checkpoint(path / "checkpoints")
        if found is None:
            raise ConfigError(f"--checkpoint {path}: no usable checkpoint under {path / 'checkpoints'}")
        folder = found[0]
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


def load_policy(config: str | Path | None, overrides: Sequence[str] = (), checkpoint: str | Path | None = None,
                device: str = "cpu"):
    """(cfg, policy) from a config file, dotted overrides and a checkpoint (a checkpoint or run folder
    brings its own config, and then `config` may be None). Raises ConfigError naming the bad field
    or path."""
    from loop_ray.config import ConfigError, load_config
    from loop_ray.diffusion.factory import build_policy
    from loop_ray.diffusion.pipeline_parts import FOLDER_KIND
    from loop_ray.utils import pin_threads

    folder, own_config = resolve_checkpoint(checkpoint) if checkpoint is not None else (None, None)
    config = config if config is not None else own_config
    if config is None:
        raise ConfigError("--config is required (unless --checkpoint is a loop-ray checkpoint or run folder)")
    cfg = load_config(config, list(overrides))
    if folder is not None:
        kind = FOLDER_KIND.get(cfg.model.kind, cfg.model.kind)  # a tiny stack's checkpoint is a real folder
        # the saved network has any LoRA merged, and a folder takes no Hugging Face revision
        cfg.model = cfg.model.model_copy(update={"path": str(folder), "kind": kind, "revision": None, "lora_rank": 0})
    pin_threads(cfg.cluster.torch_threads)
    return cfg, build_policy(cfg, device)


def run_eval(cfg, policy, out: Path, progress: bool = True) -> tuple[dict, Path | None, Path]:
    """`loop-ray eval`: the held-out reward of `policy` on the prompts and seeds every evaluation uses
    (loop_ray.evaluation.heldout); writes OUT/eval.json and OUT/grid.png. Returns (result, grid
    path or None, eval.json path)."""
    from loop_ray.prompts import load_prompts
    from loop_ray.rewards.composite import CompositeReward

    reward = CompositeReward.from_config(cfg.reward)
    prompt_set = load_prompts(cfg.prompts.val)
    result = evaluate_policy(
        policy, reward, prompt_set, cfg.eval.images_per_prompt, cfg.eval.seed, cfg.eval.batch_size,
        prompt_indices=eval_prompt_indices(cfg, prompt_set), progress=progress,
    )
    per_prompt = result["per_prompt"]
    grid = save_eval_grid(out / "grid.png", [r["prompt"] for r in per_prompt], [r["category"] for r in per_prompt],
                          result["rewards"], cfg.eval.grid_prompts or 8, lambda rows, n: result["images"][rows, :n])
    model = cfg.model.path or f"({cfg.model.kind} default)"
    settings = {"model": model, "sampling": cfg.sampling.model_dump(), "reward": cfg.reward.model_dump()}
    return result, grid, write_eval_json(result, out / "eval.json", extra={"settings": settings})


def sample_images(cfg, policy, prompts: Sequence[str], num_images: int, seed: int) -> np.ndarray:
    """`num_images` images per prompt, uint8 [P, N, H, W, 3], from the fixed seeds of `eval_seeds`. For
    the embedded model, a prompt outside its grammar is sampled with a warning naming the unknown
    words and the grammar's forms (loop_ray.toy.grammar.outside_grammar)."""
    if cfg.model.kind == "toy":
        from loop_ray.toy.grammar import outside_grammar

        for prompt in prompts:
            problem = outside_grammar(prompt)
            if problem is not None:
                log.warning("%s", problem)
    seeds = eval_seeds(seed, range(len(prompts)), num_images)
    batch = policy.sample(list(prompts), num_images, seeds, batch_size=cfg.sampling.batch_size)
    return np.asarray(batch.images).reshape(len(prompts), num_images, *batch.images.shape[1:])


def samples_target(out: str | Path) -> tuple[Path, bool]:
    """Where `loop-ray sample --out OUT` writes: (path, is_folder). A path ending in .png is the grid's
    file; a path without a suffix, or an existing folder, is a folder that gets one PNG per image and
    grid.png. Anything else is a ConfigError naming it."""
    from loop_ray.config import ConfigError

    out = Path(out)
    if out.is_dir():
        return out, True
    if out.suffix.lower() == ".png":
        return out, False
    if out.exists() or out.suffix:
        raise ConfigError(f"--out {out}: give a .png file (the grid) or a folder (one PNG per image and grid.png)")
    return out, True


def write_samples(images: np.ndarray, prompts: Sequence[str], out: Path, folder: bool) -> list[Path]:
    """The grid of `images` [P, N, H, W, 3] at `out` (folder False), or in folder `out`: grid.png and
    one PNG per image named PPP-NNN.png (prompt index, image index). Returns the paths written."""
    from PIL import Image

    num_prompts, num_images = images.shape[:2]
    grid_path = out / "grid.png" if folder else out
    written = [save_grid(images, list(prompts), grid_path, max_prompts=num_prompts, max_images=num_images)]
    if folder:
        for i in range(num_prompts):
            for j in range(num_images):
                path = out / f"{i:03d}-{j:03d}.png"
                Image.fromarray(images[i, j]).save(path)
                written.append(path)
    return written
