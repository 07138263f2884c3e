"""Evaluation through the running system: the samplers draw the held-out prompts with fixed seeds
(`plan_eval`, the same seeds as `loop-ray eval`) at the current policy version, the reward pool
scores them, and the driver reduces the rewards per prompt category and saves an image grid of
`eval.grid_prompts` prompts. Images a reward scored invalid (NaN, inf, a wrong shape, an error)
are left out of every mean and counted in `eval/rejected_images`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loop_ray.config import ExperimentConfig
from loop_ray.evaluation.evaluate import finite_mean, save_eval_grid
from loop_ray.rewards.checks import describe_problems
from loop_ray.system.run.rollout import collect, dispatch, fetch_images
from loop_ray.training.plan import Plan

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    mean: float
    by_category: dict[str, float]
    by_term: dict[str, float]
    images: int
    seconds: float
    grid: Path | None
    weight_load_seconds: float = 0.0  # samplers loading the version under evaluation (max)
    rejected_images: int = 0  # scored invalid by the reward: left out of the means

    def record(self) -> dict:
        out = {"eval/reward_mean": self.mean, "eval/images": self.images, "eval/seconds": self.seconds,
               "eval/rejected_images": self.rejected_images,
               "weights/sampler_load_seconds": self.weight_load_seconds}
        out.update({f"eval/reward/{c}": v for c, v in self.by_category.items()})
        out.update({f"eval/term/{t}": v for t, v in self.by_term.items()})
        return out


def summarise(plan: Plan, rewards: np.ndarray, parts: dict[str, np.ndarray]) -> tuple[float, dict, dict]:
    """Mean reward overall, per category, and per reward term (the NaNs of failed calls and of
    invalid rewards left out; NaN where nothing is left)."""
    categories = np.repeat(np.array(plan.categories), plan.k)
    by_category = {c: finite_mean(rewards[categories == c]) for c in dict.fromkeys(plan.categories)}
    by_term = {t: finite_mean(v) for t, v in parts.items()}
    return finite_mean(rewards), by_category, by_term



def evaluate(
    cfg: ExperimentConfig, plan: Plan, samplers, pool, version: int, weights, grid_path: Path | None
) -> EvalResult:
    rollout = dispatch(samplers, pool, plan, version, weights, cfg.reward.batch_size, evaluation=True)
    result = collect(rollout, retries=cfg.cluster.call_retries, call_timeout_s=cfg.cluster.call_timeout_s)
    mean, by_category, by_term = summarise(plan, result.rewards, result.parts)
    grid = None
    if grid_path is not None and cfg.eval.grid_prompts > 0:
        grid = save_eval_grid(grid_path, plan.prompts, plan.categories, result.rewards.reshape(len(plan.prompts), plan.k),
                              cfg.eval.grid_prompts, lambda rows, n: _grid_images(rollout, plan.k, rows, n))
    load = max((s["weight_load_seconds"] for s in result.sampler_stats), default=0.0)
    if result.rejected_images:
        log.warning("evaluation at version %d: %d of %d images rejected for invalid rewards (left out): %s",
                    version, result.rejected_images, len(plan.seeds), describe_problems(result.problems))
    return EvalResult(mean, by_category, by_term, len(plan.seeds), result.seconds, grid, load,
                      result.rejected_images)


def _grid_images(rollout, k: int, rows: list[int], n: int) -> np.ndarray | None:
    """The first n images of each prompt in `rows`, fetched from the samplers; None when a call
    failed (no grid rather than a misleading one)."""
    samples = [r * k + j for r in rows for j in range(n)]
    images = fetch_images(rollout, samples)
    if len(images) < len(samples):
        return None
    return np.stack([images[s] for s in samples]).reshape(len(rows), n, *images[samples[0]].shape)


def comparison_table(before: EvalResult, after: EvalResult) -> str:
    """Per-category before/after table of mean held-out reward."""
    lines = [f"{'category':<24}{'before':>9}{'after':>9}{'change':>9}"]
    for c, b in before.by_category.items():
        a = after.by_category.get(c, float("nan"))
        lines.append(f"{c:<24}{b:>9.3f}{a:>9.3f}{a - b:>+9.3f}")
    lines.append(f"{'all':<24}{before.mean:>9.3f}{after.mean:>9.3f}{after.mean - before.mean:>+9.3f}")
    return "\n".join(lines)
