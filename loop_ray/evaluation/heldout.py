"""The held-out evaluation's fixed draw: which prompts and which seeds, shared by the training
driver's evaluation (`loop_ray.training.plan.plan_eval`) and `loop-ray eval` (`loop_ray.evaluation.evaluate`).

It imports nothing from loop_ray (the config only for type hints), so both may import it without
importing each other. Image j of prompt i (i its index in the prompt source) uses the seed
seed * SEED_STRIDE + i * images_per_prompt + j.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from loop_ray.config import ExperimentConfig

SEED_STRIDE = 1_000_003


def eval_seeds(seed: int, prompt_indices: Sequence[int], images_per_prompt: int) -> list[int]:
    """Per-image seeds: seed * SEED_STRIDE + i * images_per_prompt + j for prompt index i, image j."""
    k = images_per_prompt
    return [seed * SEED_STRIDE + i * k + j for i in prompt_indices for j in range(k)]


def in_turn(categories: Sequence[str], n: int, rng: np.random.Generator | None = None) -> list[int]:
    """Indices of up to n items taken from the categories in turn (the first category's first item,
    the second's first, ..., then each one's second), sorted; within a category in source order, or
    in the order of one permutation per category drawn from `rng`. The one rule behind every subset
    of the held-out prompts (the evaluated prompts, the rows of an evaluation grid)."""
    by_category: dict[str, list[int]] = {}
    for i, c in enumerate(categories):
        by_category.setdefault(c, []).append(i)
    queues = [[int(i) for i in (rng.permutation(v) if rng is not None else v)] for v in by_category.values()]
    picked: list[int] = []
    while len(picked) < min(n, len(categories)):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return sorted(picked)


def eval_prompt_indices(cfg: ExperimentConfig, prompt_set) -> list[int]:
    """The held-out prompts every evaluation uses (the Ray driver's plan, `loop-ray eval`, the
    single-process loop and the study): all of them, or `eval.max_prompts` taken from the categories
    in turn with a fixed permutation within each category seeded by eval.seed (`in_turn`), in source
    order."""
    n, max_prompts = len(prompt_set), cfg.eval.max_prompts
    if max_prompts is None or max_prompts >= n:
        return list(range(n))
    return in_turn(prompt_set.categories, max_prompts, np.random.default_rng(cfg.eval.seed))
